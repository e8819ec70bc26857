"""Run megatron-core (local layer spec) on a CUDA-less torch under gloo.

``apply_cpu_compat()`` patches megatron-core where it assumes a GPU. It is idempotent and does
nothing when ``torch.cuda.is_available()``. Call it before building models (``learner.distributed``
does). Every patch names the megatron-core code it works around (file:function, 0.16.1 line numbers
unless a target says otherwise). A patch whose target moved or vanished in another release is skipped
and logged, never an import error. ``tests/parallel/test_cpu_compat.py`` shows, in a fresh process,
each failure without the patch and the behaviour with it.

Versions the tests execute: megatron-core 0.19.2 on Python 3.12 (the main environment, whole suite)
and 0.16.1 on Python 3.11 (the second CI leg: compat, learner, conversion and loss tests). On a GPU
(H200, 0.19.2) the layer is a no-op and the learner matches this CPU path (tools/gpu_check.py, part a).

Scope rules, narrowest first:
  * replace or wrap one megatron function/method (found by name, re-bound in every megatron module
    that imported it by name);
  * a torch *factory* proxy bound as ``torch`` in one megatron module (literal device="cuda");
  * a TorchFunctionMode (device="cuda" -> cpu, pin_memory off, ``.cuda()`` identity,
    ``.type()`` reports 'torch.cuda.*') entered only *inside* a list of megatron functions;
  * global stand-ins only for ``torch.cuda`` functions that always raise on a driverless machine and
    are called from hundreds of places (current_device, streams/events/synchronize).

Not covered (not needed by the learner on CPU; each raises as before): fp16 grad scalers
(optimizer/grad_scaler.py), the rerun state machine's RNG capture (rerun_state_machine.py:957),
NCCL user buffers, CUDA graphs, fine-grained activation offloading, FSDP.

Length: one short patch per upstream megatron-core function, each naming its source; kept in one file so the full list of patches is one read.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import sys
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_compat", "applied_patches", "cuda_literals_to_cpu", "filter_cpu_startup_warnings"]

log = logging.getLogger(__name__)

_MARK = "__minpro_cpu_compat__"
_APPLIED: list[str] = []
_DONE = False


def applied_patches() -> tuple[str, ...]:
    """Names of the patches applied in this process (empty with CUDA or before apply_cpu_compat)."""
    return tuple(_APPLIED)


# What megatron-core (and torch's extension loader) print on import when TransformerEngine, apex or CUDA
# are absent: expected on the CPU path, replaced by the one line apply_cpu_compat logs. Nothing else is hidden.
_CPU_ABSENT_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    r"(TE|Transformer Engine|transformer_engine|apex|Apex).{0,40}(not (installed|available|found))",
)


def filter_cpu_startup_warnings() -> None:
    """Silence only the TE/apex/CUDA-absent import messages (a no-op with CUDA). Call before megatron imports."""
    if torch.cuda.is_available():
        return
    import warnings

    for pattern in _CPU_ABSENT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply every CPU patch once; a no-op (returns ()) when CUDA is available."""
    global _DONE
    if torch.cuda.is_available():
        return ()
    if _DONE:
        return applied_patches()
    filter_cpu_startup_warnings()
    import megatron.core  # noqa: F401  (fails loudly if megatron-core itself is missing)

    for name, patch in _PATCHES:
        try:
            if patch():
                _APPLIED.append(name)
            else:
                log.info("cpu_compat: %s not applied (target not found in this megatron-core)", name)
        except Exception as exc:  # a moved symbol must never stop training from starting
            log.warning("cpu_compat: %s failed (%s: %s); continuing without it", name, type(exc).__name__, exc)
    _DONE = True
    log.warning("CPU path: no CUDA, so no TransformerEngine or apex: megatron-core's local layer spec and torch "
                "kernels, patched for CPU (parallel/cpu_compat.py: %s)", ", ".join(_APPLIED))
    return applied_patches()


# ---- helpers ----------------------------------------------------------------------------------------
def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken optional dependency of a newer release
        log.debug("cpu_compat: cannot import %s: %s", name, exc)
        return None


def _rebind(old: Any, new: Any, attr: str) -> None:
    """Point every loaded megatron module that imported ``old`` by name at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.startswith("megatron") and getattr(mod, attr, None) is old:
            setattr(mod, attr, new)


def _replace_function(module_name: str, attr: str, make: Callable[[Callable], Callable]) -> bool:
    mod = _module(module_name)
    old = getattr(mod, attr, None) if mod is not None else None
    if old is None:
        return False
    if getattr(old, _MARK, False):
        return True
    new = make(old)
    setattr(new, _MARK, True)
    setattr(mod, attr, new)
    _rebind(old, new, attr)
    return True


def _replace_method(module_name: str, cls_name: str, attr: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace a method, keeping its kind (plain, staticmethod such as __new__, or classmethod)."""
    mod = _module(module_name)
    cls = getattr(mod, cls_name, None) if mod is not None else None
    old = cls.__dict__.get(attr) if cls is not None else None
    if old is None:
        return False
    kind = type(old) if isinstance(old, (staticmethod, classmethod)) else None
    func = old.__func__ if kind is not None else old
    if getattr(func, _MARK, False):
        return True
    new = make(func)
    setattr(new, _MARK, True)
    setattr(cls, attr, kind(new) if kind is not None else new)
    return True


# ---- the scoped device mode ---------------------------------------------------------------------------
def _cpu_device(d: Any) -> Any:
    if isinstance(d, str) and d.startswith("cuda"):
        return "cpu"
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    return d


class _CudaLiteralsToCpu(TorchFunctionMode):
    """device='cuda' -> cpu, pin_memory off, ``.cuda()``/``.pin_memory()`` identity, and ``x.type()``
    answering 'torch.cuda.FloatTensor' for a CPU float tensor (megatron asserts on that string)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) for a in args)
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            if out.startswith("torch.") and not out.startswith("torch.cuda."):
                out = "torch.cuda." + out[len("torch.") :]
        return out


def cuda_literals_to_cpu() -> contextlib.AbstractContextManager:
    """The scoped mode, for callers that run other CUDA-literal megatron code (e.g. a checkpoint tool)."""
    return _CudaLiteralsToCpu() if not torch.cuda.is_available() else contextlib.nullcontext()


def _under_mode(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaLiteralsToCpu():
            return fn(*args, **kwargs)

    return wrapper


def _mode_wrap(targets: list[tuple[str, str | None, str]]) -> Callable[[], bool]:
    """Wrap (module, class or None, function) targets in the scoped mode; True if any was found."""

    def patch() -> bool:
        found = False
        for module_name, cls_name, attr in targets:
            if cls_name is None:
                ok = _replace_function(module_name, attr, _under_mode)
            else:
                ok = _replace_method(module_name, cls_name, attr, _under_mode)
            if not ok:
                log.info("cpu_compat: %s.%s not found; not wrapped", module_name, f"{cls_name}.{attr}" if cls_name else attr)
            found |= ok
        return found

    return patch


# ---- P1: torch.cuda.current_device --------------------------------------------------------------------
def _p1_current_device() -> bool:
    # megatron passes device=torch.cuda.current_device() to tensor factories in ~170 places, e.g.
    # utils.py:631 GlobalMemoryBuffer.get_tensor (local DotProductAttention), rotary_pos_embedding.py:162
    # RotaryEmbedding.get_emb, moe/router.py, p2p_communication.py, distributed/param_and_grad_buffer.py.
    # On a driverless build the original always raises, so a global stand-in changes no working code.
    if getattr(torch.cuda.current_device, _MARK, False):
        return True
    fn = lambda: "cpu"  # noqa: E731
    setattr(fn, _MARK, True)
    torch.cuda.current_device = fn
    return True


# ---- P2: the CUDA RNG tracker runs on the CPU generator -----------------------------------------------
def _p2_rng() -> bool:
    # tensor_parallel/random.py:41 _get_cuda_rng_state -> torch.cuda.random.get_rng_state raises;
    # random.py:72 _set_cuda_rng_state queues a lazy CUDA call that never runs (silently no-op);
    # random.py:217 CudaRNGStatesTracker.add calls torch.cuda.get_rng_state (raises);
    # random.py:422 model_parallel_cuda_manual_seed seeds only the (absent) CUDA generator.
    # The tracker (dropout in TP regions, activation recompute) then forks the CPU generator instead.
    name = "megatron.core.tensor_parallel.random"
    ok = _replace_function(name, "_get_cuda_rng_state", lambda old: lambda *a, **k: torch.get_rng_state())
    ok &= _replace_function(name, "_set_cuda_rng_state", lambda old: lambda state, *a, **k: torch.set_rng_state(state))

    def make_add(old: Callable) -> Callable:
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        return add

    ok &= _replace_method(name, "CudaRNGStatesTracker", "add", make_add)

    def make_seed(old: Callable) -> Callable:
        @functools.wraps(old)
        def model_parallel_cuda_manual_seed(seed: int, *args, **kwargs):
            out = old(seed, *args, **kwargs)
            torch.manual_seed(seed)  # what torch.cuda.manual_seed(seed) does to the default GPU generator
            return out

        return model_parallel_cuda_manual_seed

    ok &= _replace_function(name, "model_parallel_cuda_manual_seed", make_seed)
    # fork() logs "CPU RNG state changed within GPU RNG context" on every fork: here that is the point.
    logging.getLogger(name).setLevel(logging.ERROR)
    return ok


# ---- P3: te_general_gemm undefined without TransformerEngine ------------------------------------------
def _p3_te_general_gemm() -> bool:
    # transformer/moe/moe_utils.py:1192 RouterGatingLinearFunction.forward tests
    # `te_general_gemm is not None`, but the name is bound only inside the TE import (moe_utils.py:34):
    # NameError in every MoE router (fixed upstream by 0.19).
    mod = _module("megatron.core.transformer.moe.moe_utils")
    if mod is None:
        return False
    if not hasattr(mod, "te_general_gemm"):
        mod.te_general_gemm = None
    return True


# ---- P4: CUDA streams and events ------------------------------------------------------------------------
class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _NullStream(_NullEvent):
    def wait_stream(self, *args: Any) -> None:
        return None

    def wait_event(self, *args: Any) -> None:
        return None

    def record_event(self, event: _NullEvent | None = None) -> _NullEvent:
        return event or _NullEvent()


_DEFAULT_STREAM = _NullStream()


def _p4_streams() -> bool:
    # transformer/moe/token_dispatcher.py:445 MoEAlltoAllTokenDispatcher.__init__ (torch.cuda.Stream),
    # :871-897 _maybe_dtoh_and_synchronize (current_stream / stream / record_event / synchronize);
    # moe/shared_experts.py:123 (overlap stream); distributed/distributed_data_parallel.py:230
    # (overlap_grad_reduce stream); ~100 more call sites. CPU ops are synchronous: streams are no-ops.
    if getattr(torch.cuda.synchronize, _MARK, False):
        return True
    stubs: dict[str, Any] = {
        "Stream": _NullStream,
        "Event": _NullEvent,
        "current_stream": lambda *a, **k: _DEFAULT_STREAM,
        "default_stream": lambda *a, **k: _DEFAULT_STREAM,
        "synchronize": lambda *a, **k: None,
        "stream": lambda *a, **k: contextlib.nullcontext(),
    }
    for attr, stub in stubs.items():
        if not isinstance(stub, type):
            setattr(stub, _MARK, True)
        setattr(torch.cuda, attr, stub)
    return True


# ---- P5/P6: literal device="cuda" in non-model code --------------------------------------------------
_MODE_TARGETS: list[tuple[str, str | None, str]] = [
    # transformer/utils.py:35 get_default_causal_mask / :40 get_sliding_window_causal_mask
    # (attention_mask=None in the local DotProductAttention; imported by name in fused_softmax.py:8)
    ("megatron.core.transformer.utils", None, "get_default_causal_mask"),
    ("megatron.core.transformer.utils", None, "get_sliding_window_causal_mask"),
    # models/common/embeddings/rope_utils.py:63 get_pos_emb_on_this_cp_rank: pin_memory + .cuda()
    # (RoPE for CP>1 with sbhd batches; imported by name into rotary/yarn embeddings)
    ("megatron.core.models.common.embeddings.rope_utils", None, "get_pos_emb_on_this_cp_rank"),
    # optimizer/clip_grads.py:90,103,115 get_grad_norm_fp32; :167 clip_grad_by_total_norm_fp32
    # (asserts grad.type() == 'torch.cuda.FloatTensor'); :207 count_zeros_fp32 (device='cuda')
    ("megatron.core.optimizer.clip_grads", None, "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", None, "count_zeros_fp32"),
    # optimizer/optimizer.py:473-485 MixedPrecisionOptimizer.__init__, :690 Float16OptimizerWithFloat16Params
    # .__init__ (param.type() == 'torch.cuda.*'), :907 FP32Optimizer.__init__ (device='cuda')
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer", "__init__"),
    # optimizer/distrib_optimizer.py:420 DistributedOptimizer._build_model_and_main_param_groups
    # (model_param.type() == 'torch.cuda.FloatTensor', else TypeError)
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
    # models/common/language_module/language_module.py:244 setup_embeddings_and_output_layer
    # (tied embeddings with PP > 1: weight.data.cuda())
    ("megatron.core.models.common.language_module.language_module", "LanguageModule", "setup_embeddings_and_output_layer"),
    # transformer/moe/moe_utils.py:998 track_moe_metrics (torch.zeros(num_layers, device="cuda"))
    ("megatron.core.transformer.moe.moe_utils", None, "track_moe_metrics"),
    # tensor_parallel/data.py:37,84 broadcast_data (device='cuda', .cuda())
    ("megatron.core.tensor_parallel.data", None, "broadcast_data"),
    # dist_checkpointing/strategies/state_dict_saver.py:204, exchange_utils.py:104-499 (device="cuda")
    ("megatron.core.dist_checkpointing.serialization", None, "save"),
    ("megatron.core.dist_checkpointing.serialization", None, "load"),
    # New in 0.19 (absent in 0.16.1, where these targets are skipped): optimizer/optimizer.py:315
    # MegatronOptimizer.has_grad_norm_group builds its flag with device='cuda' (reached from
    # ChainedOptimizer.step -> clip_grad_norm whenever clip_grad > 0); layer_wise_optimizer.py:837
    # LayerWiseDistributedOptimizer.has_grad_norm_group has the same literal.
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer", "has_grad_norm_group"),
    ("megatron.core.optimizer.layer_wise_optimizer", "LayerWiseDistributedOptimizer", "has_grad_norm_group"),
]


class _CpuFactoryTorch:
    """``torch`` as seen from one megatron module: tensor factories ignore device='cuda'/pin_memory."""

    _FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like", "full_like"})

    def __init__(self, real: Any) -> None:
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            return attr(*args, **kwargs)

        return factory


def _p6_schedules() -> bool:
    # pipeline_parallel/schedules.py:596 forward_backward_no_pipelining, :983 ..._with_interleaving,
    # :2138 ..._without_interleaving: total_num_tokens = torch.zeros([], device="cuda"). A scoped mode
    # would also cover the whole model forward; a torch proxy in this one module touches only factories.
    mod = _module("megatron.core.pipeline_parallel.schedules")
    if mod is None or not hasattr(mod, "torch"):
        return False
    if not isinstance(mod.torch, _CpuFactoryTorch):
        mod.torch = _CpuFactoryTorch(mod.torch)
    return True


# ---- P7: sequence parallelism with the torch norms ---------------------------------------------------
def _p7_torch_norm_sp() -> bool:
    # transformer/torch_norm.py:32 WrappedTorchNorm.__new__ asserts not config.sequence_parallel, but
    # MoE with TP requires sequence_parallel (moe_layer.py:381). A norm is per token, so build it without
    # the flag and tag its weights .sequence_parallel: finalize_model_grads then all-reduces their grads
    # over TP (distributed/finalize_model_grads.py:354), exactly as for TE norms.
    def make(old: Callable) -> Callable:
        def __new__(cls, config, hidden_size, *args, **kwargs):
            sp = bool(getattr(config, "sequence_parallel", False))
            if sp:
                config = copy.copy(config)
                config.sequence_parallel = False
            module = old(cls, config, hidden_size, *args, **kwargs)
            if sp:
                for p in module.parameters():
                    p.sequence_parallel = True
            return module

        return __new__

    return _replace_method("megatron.core.transformer.torch_norm", "WrappedTorchNorm", "__new__", make)


# ---- P8: alltoall split sizes on CPU --------------------------------------------------------------------
def _p8_split_sizes() -> bool:
    # transformer/moe/moe_utils.py:1093 maybe_move_tensor_to_cpu makes split sizes numpy only for CUDA
    # tensors; token_dispatcher.py:879-887 then hands CPU *tensors* to all_to_all_single as
    # output_split_sizes -> "incompatible function arguments" with EP > 1.
    def make(old: Callable) -> Callable:
        @functools.wraps(old)
        def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return old(tensor, as_numpy=as_numpy, record_stream=record_stream)

        return maybe_move_tensor_to_cpu

    return _replace_function("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", make)


_PATCHES: list[tuple[str, Callable[[], bool]]] = [
    ("P1 current_device", _p1_current_device),
    ("P2 rng", _p2_rng),
    ("P3 te_general_gemm", _p3_te_general_gemm),
    ("P4 streams", _p4_streams),
    ("P5/P6 cuda literals (scoped mode)", _mode_wrap(_MODE_TARGETS)),
    ("P6 schedules factories", _p6_schedules),
    ("P7 torch norm + sequence parallel", _p7_torch_norm_sp),
    ("P8 alltoall split sizes", _p8_split_sizes),
]

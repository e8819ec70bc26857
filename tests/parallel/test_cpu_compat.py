"""parallel.cpu_compat: in one fresh gloo process, every probe (a real megatron-core call) first runs
*without* the compatibility layer and fails the way megatron-core fails on CPU, then runs after
``apply_cpu_compat()`` and gives the right values. Also: no effect when CUDA is reported available,
idempotent, and the scoped device mode does not leak outside the wrapped functions."""

from __future__ import annotations

import pytest
import torch

from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc


def _probe_current_device():
    from megatron.core.utils import GlobalMemoryBuffer

    t = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe")  # utils.py:631
    return t.device.type, tuple(t.shape)


def _probe_rng():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker, model_parallel_cuda_manual_seed

    tracker = CudaRNGStatesTracker()
    tracker.add("probe", 123)
    outside = torch.get_rng_state()
    with tracker.fork("probe"):
        first = torch.rand(3)
    restored = torch.equal(outside, torch.get_rng_state())
    with tracker.fork("probe"):
        second = torch.rand(3)
    g = torch.Generator().manual_seed(123)
    want = torch.rand(6, generator=g)
    model_parallel_cuda_manual_seed(5)
    seeded = torch.rand(2)
    torch.manual_seed(5)
    return {
        "stream": torch.equal(torch.cat([first, second]), want),  # the tracker's own generator stream
        "restored": restored,  # the default generator is untouched outside the fork
        "seeds_cpu": torch.equal(seeded, torch.rand(2)),  # as torch.cuda.manual_seed would on a GPU
    }


def _probe_router_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(5, 8), torch.randn(4, 8)
    return torch.allclose(router_gating_linear(x, w, None, torch.float32), x @ w.t())


def _probe_streams(config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
    d = MoEAlltoAllTokenDispatcher(  # token_dispatcher.py:445 torch.cuda.Stream()
        num_local_experts=4, local_expert_indices=[0, 1, 2, 3], config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    return type(d).__name__


def _probe_causal_mask():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.utils import get_default_causal_mask

    assert fused_softmax.get_default_causal_mask is get_default_causal_mask  # re-bound where imported
    return torch.equal(get_default_causal_mask(4), torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))


def _probe_grad_norm():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = get_grad_norm_fp32([p.grad])  # clip_grads.py:103 device='cuda'
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)  # clip_grads.py:167 type() assert
    return round(float(norm), 5), [round(v, 4) for v in p.grad.tolist()]


def _probe_schedule(config):
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    model = torch.nn.Linear(2, 1)
    model.config, model.model_type = config, ModelType.encoder_or_decoder
    model.set_input_tensor = lambda tensor: None
    x = torch.ones(1, 2)

    def step(_it, m):
        out = m(x)
        return out, lambda o: (o.sum(), {"v": o.sum().detach()})

    stored = forward_backward_no_pipelining(  # schedules.py:596 torch.zeros(..., device="cuda")
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=1, micro_batch_size=1, forward_only=True,
    )
    return len(stored)


def _probe_norm_sp(config):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm = WrappedTorchNorm(config, 8)  # torch_norm.py:32 asserts not sequence_parallel
    return type(norm).__name__, bool(norm.weight.sequence_parallel), config.sequence_parallel


def _probe_split_sizes():
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu

    splits = maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    out = torch.empty(3)
    dist.all_to_all_single(out, torch.arange(3.0), output_split_sizes=splits, input_split_sizes=splits)
    return out.tolist()


def _probe_ddp_distributed_optimizer():
    """One Adam step of a tiny dense GPTModel under megatron DDP + the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=16,
                     max_sequence_length=8, position_embedding_type="rope")
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(  # distrib_optimizer.py:420 type() check; clip_grads.py:103/167
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5, use_distributed_optimizer=True), [ddp]
    )
    before = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens = torch.randint(0, 16, (1, 8))
    ddp(tokens, torch.arange(8)[None], None, labels=tokens).mean().backward()  # mask None: P5
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return bool(ok), grad_norm > 0, moved == len(before)


def _grad_norm_group_stub(optimizer_cls):
    """``optimizer_cls.has_grad_norm_group`` called on a minimal optimizer-shaped object (megatron >= 0.19;
    'absent' before): the flag tensor it all_reduces is the CUDA literal under test."""
    import types

    from megatron.core.optimizer import optimizer as opt_mod

    groups = sorted(getattr(opt_mod, "SEPARATE_GRAD_NORM_GROUPS", ()))
    if not hasattr(optimizer_cls, "has_grad_norm_group") or not groups:
        return "absent"
    p = torch.nn.Parameter(torch.zeros(2))
    setattr(p, opt_mod.GRAD_NORM_GROUP_ATTR, groups[0])
    inner = types.SimpleNamespace(get_parameters=lambda: [p])
    stub = types.SimpleNamespace(
        get_parameters=lambda: [p], get_grad_stats_parallel_group=lambda: None, chained_optimizers=[inner],
    )
    return optimizer_cls.has_grad_norm_group(stub, groups[0])


def _probe_grad_norm_group():
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return _grad_norm_group_stub(MegatronOptimizer)  # optimizer.py:315 (0.19) device='cuda'


def _probe_layer_wise_grad_norm_group():
    try:
        from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    except ImportError:
        return "absent"
    return _grad_norm_group_stub(LayerWiseDistributedOptimizer)  # layer_wise_optimizer.py:837 (0.19)


def _try(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001
        return ("error", f"{type(exc).__name__}: {str(exc)[:160]}")


def _before_and_after() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from megatron.core import package_info
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(1, 1)
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, num_moe_experts=4, moe_router_topk=2,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, use_cpu_initialization=True,
    )
    sp_config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    sp_config.sequence_parallel = True  # set after __post_init__ (which would clear it at TP1)
    probes = {
        "P1": (_probe_current_device,),
        "P2": (_probe_rng,),
        "P3": (_probe_router_gemm,),
        "P4": (_probe_streams, config),
        "P5": (_probe_causal_mask,),
        "P6_clip": (_probe_grad_norm,),
        "P6_schedule": (_probe_schedule, config),
        "P7": (_probe_norm_sp, sp_config),
        "P8": (_probe_split_sizes,),
        "P6_optimizer": (_probe_ddp_distributed_optimizer,),
        "P6_grad_norm_group": (_probe_grad_norm_group,),
        "P6_layer_wise_grad_norm_group": (_probe_layer_wise_grad_norm_group,),
    }
    before = {k: _try(*v) for k, v in probes.items()}

    from minpro_megatron.parallel import cpu_compat

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # a GPU machine: nothing may change
    device_fn = torch.cuda.current_device
    with_cuda = (cpu_compat.apply_cpu_compat(), torch.cuda.current_device is device_fn)
    torch.cuda.is_available = real

    applied = cpu_compat.apply_cpu_compat()
    from megatron.core.transformer import utils as tutils

    mask_fn = tutils.get_default_causal_mask
    again = cpu_compat.apply_cpu_compat()
    after = {k: _try(*v) for k, v in probes.items()}
    leak = _try(lambda: torch.zeros(1, device="cuda"))  # outside the wrapped functions: still an error
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return {
        "version": tuple(int(x) for x in package_info.__version__.split(".")[:2]),
        "before": before,
        "after": after,
        "with_cuda": with_cuda,
        "applied": applied,
        "idempotent": again == applied and tutils.get_default_causal_mask is mask_fn,
        "leak": leak,
    }


@pytest.fixture(scope="module")
def report() -> dict:
    (result,) = run_multiprocess(_before_and_after, 1, timeout=240)
    print(result)
    return result


# what each probe raises without the layer (megatron-core 0.16.1 and 0.19.2 on a CUDA-less torch);
# (probe -> first release where megatron-core itself no longer fails)
FIXED_UPSTREAM = {"P3": (0, 19)}
# (probe -> first release that has the code at all; before it the probe answers "absent")
INTRODUCED = {"P6_grad_norm_group": (0, 19), "P6_layer_wise_grad_norm_group": (0, 19)}
FAILS_WITHOUT = {
    "P1": "NVIDIA driver",
    "P2": "NVIDIA driver",
    "P3": "NameError: name 'te_general_gemm'",
    "P4": "CUDA",
    "P5": "NVIDIA driver",
    "P6_clip": "NVIDIA driver",
    "P6_schedule": "NVIDIA driver",
    "P7": "AssertionError: sequence parallel not supported",
    "P8": "TypeError",
    "P6_optimizer": "NVIDIA driver",
    "P6_grad_norm_group": "NVIDIA driver",
    "P6_layer_wise_grad_norm_group": "NVIDIA driver",
}


@pytest.mark.parametrize("probe", sorted(FAILS_WITHOUT))
def test_probe_fails_without_the_layer(report, probe):
    if probe in FIXED_UPSTREAM and report["version"] >= FIXED_UPSTREAM[probe]:
        pytest.skip(f"{probe} fixed in megatron-core {FIXED_UPSTREAM[probe]}; the patch is then a no-op")
    if probe in INTRODUCED and report["version"] < INTRODUCED[probe]:
        assert report["before"][probe] == ("ok", "absent")
        pytest.skip(f"{probe}: the code first appears in megatron-core {INTRODUCED[probe]}")
    status, detail = report["before"][probe]
    assert status == "error" and FAILS_WITHOUT[probe] in detail, detail


def test_probes_work_with_the_layer(report):
    after = {k: v for k, v in report["after"].items()}
    assert all(status == "ok" for status, _ in after.values()), after
    assert after["P1"][1] == ("cpu", (2, 3))
    assert after["P2"][1] == {"stream": True, "restored": True, "seeds_cpu": True}
    assert after["P3"][1] is True
    assert after["P4"][1] == "MoEAlltoAllTokenDispatcher"
    assert after["P5"][1] is True
    assert after["P6_clip"][1] == (5.0, [0.6, 0.8, 0.0])
    assert after["P6_schedule"][1] == 1
    assert after["P7"][1] == ("RMSNorm", True, True)  # weights tagged; the caller's config untouched
    assert after["P8"][1] == [0.0, 1.0, 2.0]
    assert after["P6_optimizer"][1] == (True, True, True)  # stepped, finite norm, every weight moved
    for probe in INTRODUCED:  # True: the (stub) optimizer owns a parameter of that grad-norm group
        assert after[probe][1] == ("absent" if report["version"] < INTRODUCED[probe] else True), after[probe]


def test_no_effect_with_cuda_idempotent_and_scoped(report):
    assert report["with_cuda"] == ((), True)
    assert len(report["applied"]) == 8 and report["idempotent"]
    status, detail = report["leak"]
    assert status == "error", "device='cuda' must still fail outside the wrapped megatron functions"

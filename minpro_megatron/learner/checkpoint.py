"""Learner checkpoints with megatron dist_checkpointing (torch_dist): model + optimizer + LR scheduler +
RNG + step, written Megatron-style as ``DIR/iter_0000042/`` plus the tracker file (the protocol, its
names and the crash-safe commit live in checkpoint_tracker.py; ``latest_iteration``, ``checkpoint_path`` and
``CheckpointError`` are re-exported from there).

The model and the optimizer state are saved as sharded tensors in a layout-independent form (the
distributed optimizer's ``fully_reshardable`` format), so a checkpoint written with one TP/PP/EP/CP/DP
layout loads into another. RNG states are per rank: they are restored only when the layout is the same
(otherwise the new run keeps its seeded RNG and the log says so).

``dist_checkpointing.save`` spawns a multiprocessing Manager: the calling script needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from minpro_megatron.checkpoint_tracker import (
    TRACKER,
    CheckpointError,
    checkpoint_path,
    commit_checkpoint,
    latest_iteration,
    prepare_staging,
    staging_path,
)
from minpro_megatron.learner.model_provider import unwrap_model

if TYPE_CHECKING:
    from minpro_megatron.learner.learner import Learner

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_iteration",
    "checkpoint_path",
    "model_sharded_state_dict",
    "load_model_state",
    "CheckpointError",
    "load_rank_state",
    "read_common",
    "verify_complete",
    "layout_signature",
]

log = logging.getLogger(__name__)

_MANIFEST = "minpro_complete.json"  # written last into iter_N.tmp: which per-rank files the save produced
_ITER_DIR = re.compile(r"iter_\d{7}")
# Layout-independent optimizer tensors: the canonical per-parameter form, named by parameter, without
# the "chained_<i>." prefix that would tie them to how many optimizers this layout chains.
_OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def layout_signature() -> dict[str, int]:
    """This rank's parallel layout as saved in a checkpoint's common state (``layout``)."""
    from megatron.core import parallel_state as ps

    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _model_keys(n_chunks: int) -> list[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def model_sharded_state_dict(model_chunks: list) -> dict[str, Any]:
    """{"model": ...} for one chunk, {"model0": ..., "model1": ...} with virtual pipelining."""
    chunks = [unwrap_model(m) for m in model_chunks]
    return {key: c.sharded_state_dict() for key, c in zip(_model_keys(len(chunks)), chunks)}


def load_model_state(model_chunks: list, state: dict[str, Any]) -> None:
    """Load the model part of a loaded checkpoint (``model_sharded_state_dict``'s keys) into the chunks, strictly."""
    chunks = [unwrap_model(m) for m in model_chunks]
    for chunk, key in zip(chunks, _model_keys(len(chunks))):
        chunk.load_state_dict(state[key], strict=True)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _sharded_rng(data: Any) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _full_state(learner: "Learner", is_loading: bool, with_rng: bool, extra: dict | None) -> dict[str, Any]:
    state = model_sharded_state_dict(learner.model)
    state["optimizer"] = learner.optimizer.sharded_state_dict(state_model_view(state), is_loading=is_loading, metadata=_OPTIM_FORMAT)
    state["scheduler"] = learner.scheduler.state_dict()
    state["step"] = learner.step
    state["layout"] = layout_signature()
    state["num_optimizers"] = _num_optimizers(learner.optimizer)
    state["extra"] = extra or {}
    if with_rng:
        state["rng_state"] = _sharded_rng(_rng_state() if not is_loading else None)
    return state


def state_model_view(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a full state dict the optimizer maps its parameters against."""
    return {k: v for k, v in state.items() if k.startswith("model")}


def save_checkpoint(
    learner: "Learner",
    root: str | Path,
    extra: dict | None = None,
    keep_last: int | None = None,
    rank_state: dict | None = None,
    iteration: int | None = None,
) -> Path:
    """Save under ``root`` at ``iteration`` (default ``learner.step``). ``extra``: state shared by all
    ranks (from rank 0); ``rank_state``: this rank's own state (plain types and tensors), one file per
    rank.

    Crash-safe: everything is written into ``iter_N.tmp``, fsync'd, renamed to ``iter_N``, and only then
    does the tracker (written atomically, fsync'd) name it; the iteration the tracker names is never
    deleted or rewritten (saving it again is a no-op). A kill at any moment leaves the previous complete
    checkpoint tracked."""
    from megatron.core import dist_checkpointing

    from minpro_megatron.parallel.json_collectives import broadcast_json

    iteration = learner.step if iteration is None else iteration
    root = Path(root)
    path = checkpoint_path(root, iteration)
    # rank 0 decides for everyone (ranks on other nodes may see a stale view of a shared filesystem)
    tracked = broadcast_json(_tracked_or_none(root) if dist.get_rank() == 0 else None, src=0)
    if tracked == iteration:
        log.info("checkpoint %s is already the tracked one: not saved again", path)
        return path
    tmp = prepare_staging(root, iteration) if dist.get_rank() == 0 else staging_path(root, iteration)
    dist.barrier()
    _ensure_optimizer_state(learner.optimizer)  # a learner that has not stepped yet has no Adam state
    with _cpu_mode():
        dist_checkpointing.save(_full_state(learner, is_loading=False, with_rng=True, extra=extra), str(tmp))
    if rank_state is not None:
        with open(tmp / _rank_file(dist.get_rank()), "wb") as f:
            torch.save(rank_state, f)
            f.flush()
            os.fsync(f.fileno())
    dist.barrier()
    if dist.get_rank() == 0:
        manifest = {"iteration": iteration, "world": dist.get_world_size(), "rank_states": rank_state is not None}
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        commit_checkpoint(root, iteration)  # an existing iter_N here is an untracked leftover: replaced
        if keep_last:
            _prune(root, keep_last, tracked=iteration)
    dist.barrier()
    return path


def _tracked_or_none(root: Path) -> int | None:
    try:
        return latest_iteration(root)
    except CheckpointError:
        return None


def _rank_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def verify_complete(path: str | Path, common: dict | None = None) -> None:
    """Raise CheckpointError when ``path`` lacks a file its writer produced (a per-rank state file): ranks
    that resumed from different states would disagree on the data position."""
    path = Path(path)
    manifest_file = path / _MANIFEST
    if manifest_file.is_file():
        m = json.loads(manifest_file.read_text())
        world, expected = int(m["world"]), bool(m["rank_states"])
    else:  # written before the manifest existed: judge by the files themselves
        world = int(((common or {}).get("layout") or {}).get("world", 0))
        expected = any(path.glob("rank_state_*.pt"))
    if expected:
        missing = [_rank_file(r) for r in range(world) if not (path / _rank_file(r)).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                f"missing (it was saved by {world} ranks); restore the file(s) or point {TRACKER} at an "
                "earlier complete iteration"
            )


def read_common(root: str | Path, iteration: int | None = None) -> tuple[Path, dict]:
    """(checkpoint directory, its common state: scheduler, step, layout, extra) without loading tensors."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no checkpoint under {root}: {TRACKER} is missing")
    path = checkpoint_path(root, iteration)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (tracker says iteration {iteration})")
    return path, dist_checkpointing.load_common_state_dict(str(path))


def load_checkpoint(
    learner: "Learner", root: str | Path, iteration: int | None = None, load_optimizer: bool = True
) -> dict:
    """Load into ``learner`` (any parallel layout); returns the checkpoint's ``extra`` dict.

    The optimizer state is restored when the layout chains the same optimizers as the saving one (dense
    and expert parameters get separate optimizers when EP > 1 or ETP != TP); otherwise the model,
    LR schedule and step are restored and the Adam moments restart, with a warning.
    """
    from megatron.core import dist_checkpointing

    path, common = read_common(root, iteration)
    verify_complete(path, common)
    same_layout = common.get("layout") == layout_signature()
    if not same_layout:
        log.warning("checkpoint %s was saved with layout %s; this run is %s: RNG states are not restored",
                    path, common.get("layout"), layout_signature())
    restore_moments = load_optimizer and common.get("num_optimizers") == _num_optimizers(learner.optimizer)
    if load_optimizer and not restore_moments:
        log.warning("checkpoint %s chains %s optimizer(s), this layout %d: loading the model, LR schedule and "
                    "step; Adam moments restart", path, common.get("num_optimizers"), _num_optimizers(learner.optimizer))
    with _cpu_mode():
        if restore_moments:
            _ensure_optimizer_state(learner.optimizer)
            template = _full_state(learner, is_loading=True, with_rng=same_layout, extra=None)
        else:
            template = model_sharded_state_dict(learner.model)
        try:
            state = dist_checkpointing.load(template, str(path))
        except BaseException as exc:  # torch's CheckpointException is a BaseException; name the tensor and path
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"loading {path} failed: {exc}") from exc
    load_model_state(learner.model, state)
    if restore_moments:
        with _cpu_mode(), _torch_adam_param_state_load(learner.optimizer):
            learner.optimizer.load_state_dict(state["optimizer"])
        if same_layout and "rng_state" in state:
            _set_rng_state(state["rng_state"])
    else:  # bf16/fp16 models keep fp32 main copies in the optimizer: refresh them from the loaded weights
        learner.optimizer.reload_model_params()
    if load_optimizer and "scheduler" in common:  # model-only checkpoints (tools/convert_hf_to_megatron) have none
        learner.scheduler.load_state_dict(_scheduler_state_for(learner.scheduler, common["scheduler"]))
        learner.step = int(common["step"])
    return dict(common.get("extra") or {})


def load_rank_state(root: str | Path, iteration: int | None = None) -> dict | None:
    """This rank's ``rank_state`` from a checkpoint saved with the same layout (None otherwise)."""
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        return None
    from megatron.core import dist_checkpointing

    path = checkpoint_path(root, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    verify_complete(path, common)
    f = path / _rank_file(dist.get_rank())
    if common.get("layout") != layout_signature() or not f.is_file():
        return None
    return torch.load(f, weights_only=True)


def _num_optimizers(optimizer: Any) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of a fresh torch Adam the state a loaded checkpoint will overwrite.

    Without Apex or TE, DistributedOptimizer.state_dict (megatron-core 0.16.1 optimizer/distrib_optimizer.py:640)
    reads a 'step' from every parameter's state, but the loading path's init_state_fn
    (optimizer/__init__.py:391) creates only exp_avg / exp_avg_sq, so a learner that has not stepped yet
    cannot build its load template. The values are placeholders: load_state_dict replaces all of them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st and not isinstance(inner, torch.optim.SGD):
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    st["step"] = torch.zeros((), dtype=torch.float32)


@contextlib.contextmanager
def _torch_adam_param_state_load(optimizer: Any) -> Iterator[None]:
    """Load parameter states into torch Adam, whose per-parameter state carries a 'step'.

    Without Apex or TE, DistributedOptimizer.load_state_dict (0.16.1 distrib_optimizer.py:817) puts a
    'step' into every parameter state, and then _set_main_param_and_optimizer_states (:936) copies every
    key of that state from the checkpoint tensors, which have no 'step' -> KeyError. While loading, copy
    only the keys the checkpoint has (the step itself is restored from the param groups). Also, :821
    assigns ONE step tensor to every parameter, and torch Adam increments it in place once per parameter,
    so the next update would use a wrong bias correction: give each parameter its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    patched = []
    if not getattr(dopt, "HAVE_APEX_OR_TE", True):
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, dopt.DistributedOptimizer) and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                def set_states(model_param, tensors, _opt=opt):
                    group_index, group_order = _opt.model_param_group_index_map[model_param]
                    main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
                    state = _opt.optimizer.state[main_param]
                    for key, value in tensors.items():
                        (main_param if key == "param" else state[key]).copy_(value)

                opt._set_main_param_and_optimizer_states = set_states
                patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


def _cpu_mode():
    """The optimizer's reshardable state gather/scatter moves buffers with ``.cuda()``: run it under the
    CPU compatibility layer's scoped device mode when CUDA is absent (a no-op on GPUs)."""
    from minpro_megatron.parallel.cpu_compat import cuda_literals_to_cpu

    return cuda_literals_to_cpu()


def _set_rng_state(rng: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(rng["torch"])
    get_cuda_rng_tracker().set_states(rng["tracker"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def _prune(root: Path, keep_last: int, tracked: int) -> None:
    """Keep the newest ``keep_last`` complete iterations (always the tracked one); drop stale ``.tmp`` saves."""
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir() and _ITER_DIR.fullmatch(p.name))
    for old in iters[:-keep_last]:
        if old.name != checkpoint_path(root, tracked).name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _scheduler_state_for(scheduler: Any, saved: dict) -> dict:
    """The saved LR-scheduler state with the horizon fields taken from this run's scheduler.

    megatron's OptimizerParamScheduler.load_state_dict asserts that every saved hyper-parameter equals the
    class value; the decay/increment horizons follow from train.steps, which a resumed run may raise
    (extending a run). Those are taken from this run; the step count (num_steps) and the learning rates
    come from the checkpoint (a changed optim.lr is refused earlier, by the resume config check)."""
    state = dict(saved)
    for key in ("lr_decay_steps", "decay_steps", "wd_incr_steps"):
        if key in state:
            own = getattr(scheduler, key if key != "decay_steps" else "lr_decay_steps", None)
            if own is not None:
                state[key] = own
    return state

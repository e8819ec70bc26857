"""Model-only torch_dist checkpoints in the Learner's layout (``ROOT/iter_XXXXXXX`` + tracker file).

What the converters write and read. A checkpoint saved here loads with
``learner.checkpoint.load_checkpoint(learner, ROOT, load_optimizer=False)`` in any TP/PP/EP/CP layout
(dist_checkpointing reshards), and a Learner checkpoint (model + optimizer) loads here: only the model
part is read. The common state carries ``extra = {"model_config": ..., "hf_config": ...}`` so the
reverse conversion needs no hand-written model arguments.

``dist_checkpointing.save`` spawns a multiprocessing Manager: the calling script needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.config import ModelConfig
from minpro_megatron.config.base import from_dict, to_dict
from minpro_megatron import checkpoint_tracker as tracker
from minpro_megatron.checkpoint_tracker import CheckpointError, checkpoint_path
from minpro_megatron.learner.checkpoint import layout_signature, load_model_state, model_sharded_state_dict

__all__ = ["save_model_checkpoint", "load_model_checkpoint", "checkpoint_extra", "model_config_from_checkpoint"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    root: str | Path,
    *,
    model: ModelConfig,
    hf_config: dict | None = None,
    iteration: int = 0,
) -> Path:
    """Save the model chunks' parameters as ``ROOT/iter_<iteration>`` (collective)."""
    from megatron.core import dist_checkpointing

    from minpro_megatron.parallel.cpu_compat import cuda_literals_to_cpu

    # Write-then-rename: into iter_N.tmp; an existing iter_N is replaced only once the new one is complete.
    tmp = tracker.prepare_staging(root, iteration) if _rank() == 0 else tracker.staging_path(root, iteration)
    _barrier()
    state: dict[str, Any] = model_sharded_state_dict(list(model_chunks))
    state["step"] = iteration
    state["layout"] = layout_signature()
    state["extra"] = {"model_config": to_dict(model), "hf_config": hf_config}
    with cuda_literals_to_cpu():
        dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        tracker.commit_checkpoint(root, iteration)
    _barrier()
    return checkpoint_path(root, iteration)


def _resolve(root: str | Path, iteration: int | None) -> Path:
    root = Path(root)
    if (root / "common.pt").is_file() or (root / "metadata.json").is_file():
        return root  # an iter_XXXXXXX directory itself
    iteration = tracker.latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no checkpoint under {root}: {tracker.TRACKER} is missing (pass the iter_XXXXXXX directory)")
    path = checkpoint_path(root, iteration)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    return path


def checkpoint_extra(root: str | Path, iteration: int | None = None) -> dict:
    """The ``extra`` dict of a checkpoint's common state ({} when absent)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(_resolve(root, iteration)))
    return dict(common.get("extra") or {})


def model_config_from_checkpoint(root: str | Path, iteration: int | None = None) -> ModelConfig | None:
    """The ModelConfig a converter stored in the checkpoint (None for checkpoints without one)."""
    extra = checkpoint_extra(root, iteration)
    if extra.get("model_config"):
        return from_dict(ModelConfig, dict(extra["model_config"]))
    if extra.get("hf_config"):
        from minpro_megatron.config.hf_model import model_config_from_hf

        return model_config_from_hf(extra["hf_config"])
    return None


@torch.no_grad()
def load_model_checkpoint(model_chunks: Sequence[torch.nn.Module], root: str | Path, iteration: int | None = None) -> Path:
    """Load the parameters of ``ROOT`` (any layout) into the model chunks (collective); errors name the tensor."""
    from megatron.core import dist_checkpointing

    from minpro_megatron.parallel.cpu_compat import cuda_literals_to_cpu

    path = _resolve(root, iteration)
    chunks = list(model_chunks)
    with cuda_literals_to_cpu():
        try:
            state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001  torch DCP's CheckpointException is a BaseException
            # dist_checkpointing's message names the key and both shapes
            raise CheckpointError(f"loading the model from {path} failed: {exc}") from exc
    load_model_state(chunks, state)
    return path

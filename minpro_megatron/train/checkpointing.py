"""The run's checkpoints: the learner's (learner/checkpoint.py) plus every stateful part of the loop as
this rank's state (``state_dict`` / ``load_state_dict``: step counters, warm start, skipped updates,
the prompt stream's cursor, the batch source's pending batches, the engine's version), and the model
metadata tools/convert_megatron_to_hf.py needs. Also where a run starts from: its own newest checkpoint,
``checkpoint.load`` (a full checkpoint, or a model-only one converted from Hugging Face), or nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from minpro_megatron.checkpoint_tracker import TRACKER
from minpro_megatron.config import RunConfig, to_dict
from minpro_megatron.train.tokens import BUILTIN_TOKENIZER

__all__ = ["Stateful", "Resumed", "resume", "save", "model_metadata"]

log = logging.getLogger("minpro_megatron.train")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Resumed:
    """What ``resume`` found: ``rank_state`` is None for a new run or a resume in another layout."""

    kind: str  # "new" | "resumed" | "model_only"
    rl_step: int = 0
    rank_state: dict[str, Any] | None = None
    path: Path | None = None


def model_metadata(cfg: RunConfig) -> dict:
    """The (resolved) model config, the original config.json and the tokenizer: all a converter needs."""
    m = cfg.model
    hf_config = None
    if m.hf_path:
        from minpro_megatron.config.hf_model import load_hf_config

        hf_config = load_hf_config(m.hf_path)
    return {"model_config": to_dict(m), "hf_config": hf_config, "tokenizer": m.tokenizer_path or m.hf_path or BUILTIN_TOKENIZER}


def save(learner: Any, cfg: RunConfig, ckpt_dir: Path, rl_step: int, rank_state: dict[str, Any]) -> Path:
    from minpro_megatron.learner.checkpoint import save_checkpoint

    return save_checkpoint(
        learner, ckpt_dir, extra={"rl_step": rl_step, "config": to_dict(cfg), **model_metadata(cfg)},
        keep_last=cfg.checkpoint.keep_last, rank_state=rank_state, iteration=rl_step,
    )


def resume(learner: Any, cfg: RunConfig, ckpt_dir: Path, rank: int) -> Resumed:
    """Load the learner's state from where this run continues or starts; the caller restores the rest."""
    from minpro_megatron.learner.checkpoint import latest_iteration, load_checkpoint, load_rank_state, read_common

    root = Path(cfg.checkpoint.load) if cfg.checkpoint.load else ckpt_dir
    if cfg.checkpoint.load and latest_iteration(ckpt_dir) is not None:
        root = ckpt_dir  # a requeued run continues from its own checkpoints, not from its starting point
    elif cfg.checkpoint.load and _is_model_only(root):
        return _start_from_model_checkpoint(learner, cfg, root, ckpt_dir, rank)
    if latest_iteration(root) is None:
        if cfg.checkpoint.load:
            raise FileNotFoundError(f"checkpoint.load={str(root)!r} holds no checkpoint (no {TRACKER})")
        return Resumed("new")
    from minpro_megatron.config.resume import check_resume_config

    path, common = read_common(root)
    check_resume_config((common.get("extra") or {}).get("config"), to_dict(cfg), str(path), defaults=to_dict(RunConfig()))
    extra = load_checkpoint(learner, root)
    state = load_rank_state(root)
    if rank == 0:
        print(f"resumed from {root} at RL step {int(state['rl_step']) if state else int(extra.get('rl_step', 0))}", flush=True)
    if state is None:
        log.warning("resuming from %s with another layout: trainer state (data cursor, pending batches) restarts", root)
        return Resumed("resumed", int(extra.get("rl_step", 0)), None, root)
    return Resumed("resumed", int(state["rl_step"]), state, root)


def _start_from_model_checkpoint(learner: Any, cfg: RunConfig, root: Path, ckpt_dir: Path, rank: int) -> Resumed:
    """checkpoint.load is a model-only checkpoint (tools/convert_hf_to_megatron.py): a new run from its
    weights, said in plain words (step 0, new optimizer and data)."""
    from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint

    path = load_model_checkpoint(learner.model, root)
    learner.optimizer.reload_model_params()
    if rank == 0:
        warm = (f"then {cfg.train.warm_start_steps} warm-start steps" if cfg.train.warm_start_steps
                else "no warm start (train.warm_start_steps=0)")
        print(f"starting a new run from the weights of {path} (a model-only checkpoint, e.g. converted from "
              f"Hugging Face): RL step 0, a fresh optimizer and LR schedule, the data from the start, {warm}; "
              f"checkpoints go to {ckpt_dir}", flush=True)
    return Resumed("model_only", path=path)


def _is_model_only(root: Path) -> bool:
    """A checkpoint without optimizer or scheduler state (what the converters write)."""
    from megatron.core import dist_checkpointing

    from minpro_megatron.learner.checkpoint import checkpoint_path, latest_iteration

    iteration = latest_iteration(root)
    if iteration is None:
        return False
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_path(root, iteration)))
    return "scheduler" not in common

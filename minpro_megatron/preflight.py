"""Checks of everything a run reads from outside its config, made before any model is built or folder
written: dataset files, the HF checkpoint, the tokenizer, a checkpoint to load, optional packages.

Each failure is a ``UserError`` naming the config field and the fix (one line through cli_support.run_cli).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from minpro_megatron.checkpoint_tracker import TRACKER, has_checkpoint
from minpro_megatron.cli_support import require_dir, require_file
from minpro_megatron.config import RunConfig
from minpro_megatron.config.base import ConfigError, UserError

__all__ = ["check_run_inputs", "has_checkpoint"]  # has_checkpoint is checkpoint_tracker.py's (re-exported)

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def check_run_inputs(cfg: RunConfig) -> None:
    """Every input path of ``cfg`` exists and has the right kind; optional packages it enables are installed."""
    d = cfg.data
    if d.task == "jsonl" and not d.train_path:
        raise ConfigError("data.task=jsonl needs data.train_path (a .jsonl or .parquet file; docs/data.md)")
    for name in ("train_path", "eval_path"):
        path = getattr(d, name)
        if path is None or (name == "train_path" and d.task != "jsonl"):
            continue
        require_file(path, f"data.{name}")
        if Path(path).suffix not in _DATA_SUFFIXES:
            raise UserError(f"data.{name}={path!r}: unsupported extension; use .jsonl or .parquet (docs/data.md)")
        from minpro_megatron.data.dataset import load_problems

        load_problems(path, d.prompt_key, d.answer_key)  # every row checked now, not after the model is built
    m = cfg.model
    if m.hf_path:
        require_dir(m.hf_path, "model.hf_path")
        require_file(Path(m.hf_path) / "config.json", "model.hf_path")
        if not any(Path(m.hf_path).glob("*.safetensors")):
            raise UserError(f"model.hf_path={m.hf_path!r} holds no *.safetensors weights")
    if m.tokenizer_path:
        require_dir(m.tokenizer_path, "model.tokenizer_path")
    if cfg.checkpoint.load:
        require_dir(cfg.checkpoint.load, "checkpoint.load")
        if not has_checkpoint(cfg.checkpoint.load):
            raise UserError(
                f"checkpoint.load={cfg.checkpoint.load!r} holds no checkpoint (no {TRACKER}); point it at a "
                "run's checkpoints/ folder or the output of tools/convert_hf_to_megatron.py"
            )
    for module in d.reward_modules:
        try:
            importlib.import_module(module)  # registers its rewards (rewards.register_reward)
        except ImportError as exc:
            raise UserError(f"data.reward_modules: cannot import {module!r} ({exc}); is it on PYTHONPATH?") from None
    if getattr(cfg.logging, "wandb", False) and importlib.util.find_spec("wandb") is None:
        raise UserError("logging.wandb=true but the wandb package is not installed: pip install wandb, or set "
                        "logging.wandb=false")

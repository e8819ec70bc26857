"""The checkpoint tracker protocol (Megatron's): ``ROOT/iter_0000042/`` directories plus
``ROOT/latest_checkpointed_iteration.txt``, which names the newest complete one.

The one module that knows the file's name, reads it and writes it; it imports no torch, so the login-node
checks (preflight.py), the Slurm doctor and the evaluation use it as the learner (learner/checkpoint.py)
and the converters (convert/megatron_checkpoint.py) do.

Writing is crash-safe: a checkpoint is written into ``iter_N.tmp`` (``prepare_staging``), then
``commit_checkpoint`` fsyncs it, renames it to ``iter_N`` and only then points the tracker at it (write to
a temporary file, fsync, rename: atomic_io.py). A reader therefore sees the previous iteration or the new
one, never a half-written number or a half-written directory; a tracker that does not hold an iteration
number (written by something else and cut short) is refused with an error naming the file, not guessed at.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from minpro_megatron.atomic_io import atomic_write_text, fsync_dir, fsync_tree
from minpro_megatron.config.base import UserError

__all__ = [
    "TRACKER",
    "CheckpointError",
    "tracker_path",
    "has_checkpoint",
    "checkpoint_path",
    "latest_iteration",
    "write_tracker",
    "staging_path",
    "prepare_staging",
    "commit_checkpoint",
]

TRACKER = "latest_checkpointed_iteration.txt"
_ITERATION = re.compile(r"[0-9]+")


class CheckpointError(RuntimeError, UserError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names what and where."""


def tracker_path(root: str | Path) -> Path:
    return Path(root) / TRACKER


def has_checkpoint(root: str | Path) -> bool:
    """Whether ``root`` holds a tracker (it may still name an iteration that fails to load)."""
    return tracker_path(root).is_file()


def checkpoint_path(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the tracker under ``root`` names (None when there is no tracker); CheckpointError,
    naming the file, when it holds anything but a non-negative integer."""
    tracker = tracker_path(root)
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not _ITERATION.fullmatch(text):
        raise CheckpointError(f"{tracker} should hold an iteration number, found {text!r}")
    return int(text)


def write_tracker(root: str | Path, iteration: int) -> None:
    """Point the tracker at ``iteration`` (atomic and durable: the commit point of a save)."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration={iteration!r} must be a non-negative int")
    atomic_write_text(tracker_path(root), str(iteration))


def staging_path(root: str | Path, iteration: int) -> Path:
    """``ROOT/iter_N.tmp``: where iteration N is written before ``commit_checkpoint`` renames it."""
    path = checkpoint_path(root, iteration)
    return path.with_name(path.name + ".tmp")


def prepare_staging(root: str | Path, iteration: int) -> Path:
    """A fresh, empty ``staging_path`` (one process: rank 0); a leftover of a save killed earlier is removed."""
    tmp = staging_path(root, iteration)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(root: str | Path, iteration: int) -> Path:
    """Make the complete ``iter_N.tmp`` the tracked ``iter_N`` (one process: rank 0): fsync it, rename it
    into place (an existing ``iter_N`` is moved aside first and deleted last), then write the tracker."""
    root = Path(root)
    tmp, path = staging_path(root, iteration), checkpoint_path(root, iteration)
    fsync_tree(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(root)
    write_tracker(root, iteration)
    if old.exists():
        shutil.rmtree(old)
    return path

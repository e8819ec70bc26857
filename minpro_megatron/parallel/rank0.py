"""Rank-0-only phases (weight sync, server probes, fleet start-up, generation) that end with a status
broadcast: when rank 0 fails, every rank raises the same error at once instead of waiting in its next
collective until the timeout (or dying later with an unrelated "connection reset").

    result = rank0_phase("weight sync to step 3", lambda: fleet.sync_weights(...))
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from minpro_megatron.parallel.json_collectives import broadcast_json

__all__ = ["Rank0PhaseError", "rank0_phase", "broadcast_status"]

T = TypeVar("T")


class Rank0PhaseError(RuntimeError):
    """A rank-0-only phase failed; raised on every rank with rank 0's error message."""


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast_status(phase: str, error: BaseException | None) -> None:
    """Collective: rank 0's ``error`` (None = ok) reaches every rank, which then all raise it."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    if _world() > 1:
        message = broadcast_json(message if _rank() == 0 else None, src=0)
    if message is not None:
        exc = Rank0PhaseError(f"{phase} failed on rank 0: {message}")
        if error is not None:
            raise exc from error
        raise exc


def rank0_phase(phase: str, fn: Callable[[], T], on_error: Callable[[], None] | None = None) -> T | None:
    """Run ``fn`` on global rank 0 (None elsewhere), then broadcast whether it worked. ``on_error`` runs on
    rank 0 after a failure and before the broadcast (e.g. to drain a collective iterator the other ranks
    are still stepping through)."""
    result: T | None = None
    error: BaseException | None = None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # KeyboardInterrupt / SystemExit are not reported, they end the process
            error = exc
            if on_error is not None:
                on_error()
    broadcast_status(phase, error)
    return result

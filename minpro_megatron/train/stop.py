"""Stop requests for long SPMD jobs: a preempted or time-limited Slurm job saves and exits cleanly.

Two ways a stop arrives, both handled here:
- the job script's USR1/TERM trap writes the stop file (``$MINPRO_STOP_FILE``): Slurm sends USR1 to the
  batch shell ``--signal=B:USR1@120`` seconds before the time limit. The trap does not forward the signal
  because torchrun dies on USR1 instead of passing it to its workers.
- SIGTERM/SIGUSR1 reaching the rank itself (scancel, preemption: Slurm signals every step process).

Ranks see these at different moments, so the decision is collective: ``should_stop()`` all-reduces a
flag (MAX) and every rank stops after the same step. Call it once per step (one tiny collective).

    stop = StopRequest.install()
    for step in ...:
        train_step()
        if stop.should_stop():
            save_checkpoint(); break
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["StopRequest", "STOP_FILE_ENV"]

STOP_FILE_ENV = "MINPRO_STOP_FILE"


class StopRequest:
    def __init__(self, stop_file: str | os.PathLike | None = None) -> None:
        path = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(path) if path else None
        self.signal_name: str | None = None
        self.reason: str | None = None  # set once should_stop() returned True

    @classmethod
    def install(cls, stop_file: str | os.PathLike | None = None,
                signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> "StopRequest":
        req = cls(stop_file)
        for sig in signals:
            signal.signal(sig, req._on_signal)
        return req

    def _on_signal(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        """Why this rank wants to stop: 'SIGTERM', 'stop file: USR1', or None."""
        if self.signal_name:
            return self.signal_name
        if self.stop_file is not None and self.stop_file.exists():
            text = self.stop_file.read_text().strip()
            return f"stop file: {text}" if text else "stop file"
        return None

    def should_stop(self, group=None) -> bool:
        """Collective over ``group`` (all ranks must call it); True on every rank if any rank wants to stop."""
        import torch
        import torch.distributed as dist

        local = self.local_reason()
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag.item()):
            self.reason = local or "another rank was asked to stop"
            return True
        return False

"""Skipped updates: a non-finite gradient skips the update (the learner all-reduces the flag, so every
rank agrees); too many in a row end the run."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["NonFiniteError", "UpdateGuard"]

log = logging.getLogger("minpro_megatron.train")


class NonFiniteError(RuntimeError):
    """Non-finite gradients or parameters: too many skipped updates, or weights that must not be published."""


class UpdateGuard:
    def __init__(self, max_in_row: int, rank: int) -> None:
        self.max_in_row, self.rank = max_in_row, rank
        self.skipped = 0  # all time
        self.in_row = 0

    def count(self, ok: bool, rl_step: int) -> None:
        if ok:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        if self.rank == 0:
            log.warning("non-finite gradient: update skipped (%d in a row, %d in all)", self.in_row, self.skipped)
        if self.in_row > self.max_in_row:
            raise NonFiniteError(
                f"{self.in_row} updates in a row had non-finite gradients (skipped; parameters are unchanged "
                f"since the last good update) at RL step {rl_step}: more than train.max_nonfinite_skips={self.max_in_row}. "
                "Lower optim.lr, check the data and rewards, or resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_updates": self.skipped, "skipped_in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped_updates", 0))
        self.in_row = int(state.get("skipped_in_row", 0))

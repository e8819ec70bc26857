"""Data-parallel helpers of the RL loop: this rank's share of a prompt list and decisions every DP rank
takes together (generation is collective when experts span DP ranks)."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DataParallel"]

T = TypeVar("T")


class DataParallel:
    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps

    @property
    def size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    @property
    def rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    @property
    def group(self) -> Any:
        return self.ps.get_data_parallel_group()

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)])
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's strided share; the list must divide evenly."""
        if len(items) % self.size:
            raise ValueError(f"{len(items)} prompts are not divisible by the data-parallel size {self.size}")
        return list(items)[self.rank :: self.size]

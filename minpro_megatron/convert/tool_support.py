"""Shared pieces of the conversion tools: layout arguments, progress display, memory statistics."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["add_layout_args", "parallel_from_args", "progress", "Stats", "rss_bytes", "peak_rss_bytes"]


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "parallel layout (default: one process; under torchrun each rank converts its shard, and "
        "tensor * pipeline * expert layouts must divide the world size)"
    )
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")


def parallel_from_args(args: argparse.Namespace):
    from minpro_megatron.config import ParallelConfig

    return ParallelConfig(tensor=args.tp, pipeline=args.pp, expert=args.ep, expert_tensor=args.etp)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stats:
    """What a conversion measured about itself (written as JSON with --stats-json)."""

    tool: str
    model_bytes: int = 0  # bytes of the HF tensors (unpadded), i.e. the model's size in its dtype
    seconds: float = 0.0
    rss_before: int = 0  # after imports and distributed start-up, before any model memory
    rss_peak: int = 0
    rss_peak_children: int = 0  # largest child (dist_checkpointing writer processes)
    phases: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self.rss_before = rss_bytes()

    def phase(self, name: str) -> None:
        self.phases[name] = round(time.perf_counter() - self._t0, 3)

    def finish(self, path: str | None, rank: int = 0) -> None:
        """Record the totals; write them to ``path`` (rank 0) or ``path.rank<r>`` (other ranks)."""
        self.seconds = time.perf_counter() - self._t0
        self.rss_peak = peak_rss_bytes()
        self.rss_peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if path:
            data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
            Path(path if rank == 0 else f"{path}.rank{rank}").write_text(json.dumps(data, indent=2))


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool) -> Iterator:
    """A rich progress bar (``advance(n)`` callable) when enabled, else a no-op callable."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)

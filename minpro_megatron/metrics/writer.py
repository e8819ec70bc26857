"""Metrics sink of the driver rank: TensorBoard event files plus a JSONL copy (easy to diff and grep).

Every metric the trainer produces goes through ``MetricsWriter.scalars``; names are "section/metric"
(e.g. "loss/clip_frac_high", "rollout/reward_mean"). Non-finite values are written too (TensorBoard
shows them as gaps), so a NaN is visible instead of silently dropped. Internal metrics ("debug/...", e.g.
the batch digest that makes resume checkable) go to metrics.jsonl only.

Resuming: ``keep_through=R`` keeps every point up to step R (the checkpoint's step, whose own points are
already logged) and drops what a killed run logged after it, in TensorBoard (purge from R + 1) and in
metrics.jsonl (rows above R removed, rewritten atomically). ``keep_through=None`` starts the logs over.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

__all__ = ["MetricsWriter"]


class MetricsWriter:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard: bool = True, keep_through: int | None = None,
                 wandb: dict | None = None) -> None:
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None:  # optional: imported only when logging.wandb is on (wandb.init(**wandb))
            import wandb as wandb_module

            self._wandb = wandb_module.init(**wandb, resume="allow")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events at steps > keep_through written before (by a killed run) are dropped when read back
            purge = 0 if keep_through is None else keep_through + 1
            self._tb = SummaryWriter(str(self.log_dir), purge_step=purge)
        jsonl = self.log_dir / "metrics.jsonl"
        _truncate_jsonl(jsonl, keep_through)
        self._jsonl = open(jsonl, "a")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for name, value in clean.items():
                if not name.startswith("debug/"):  # internal checks (batch digests) stay in metrics.jsonl
                    self._tb.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            # the warm start and RL share the step numbers, so W&B (monotonic steps) gets the step as a value
            self._wandb.log({"trainer/step": step, **{k: v for k, v in clean.items() if not k.startswith("debug/")}})
        if self._jsonl is not None:
            row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def histogram(self, step: int, name: str, counts: Mapping[int, int]) -> None:
        """A histogram of integer buckets (e.g. token age -> count)."""
        if not self.enabled or self._tb is None or not counts:
            return
        import numpy as np

        values = np.repeat(np.array(list(counts.keys()), dtype=np.float64), list(counts.values()))
        self._tb.add_histogram(name, values, global_step=step, bins=np.arange(min(counts) - 0.5, max(counts) + 1.5))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _truncate_jsonl(path: Path, keep_through: int | None) -> None:
    """Keep the rows with step <= keep_through (none when None); atomic, so a kill cannot lose the rest."""
    if not path.exists():
        return
    from minpro_megatron.atomic_io import atomic_write_text

    kept = []
    if keep_through is not None:
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a kill
            if isinstance(step, int) and step <= keep_through:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))

"""The supervised warm start: steps on reference answers so the reward is not zero when RL starts, on its
own TensorBoard step axis (tb/warm_start); stoppable and resumable at any step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from minpro_megatron.config import RunConfig
from minpro_megatron.data.dataset import PromptStream
from minpro_megatron.metrics.writer import MetricsWriter
from minpro_megatron.train.dp import DataParallel
from minpro_megatron.train.guard import UpdateGuard
from minpro_megatron.train.stop import StopRequest
from minpro_megatron.train.tokens import Codec

__all__ = ["WarmStart"]


class WarmStart:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.steps = cfg.train.warm_start_steps
        self.step = 0  # warm-start updates done
        self.done = self.steps == 0

    def run(self, learner: Any, stream: PromptStream, codec: Codec, dp: DataParallel, guard: UpdateGuard,
            stop: StopRequest, save: Callable[[], Any], out_dir: Path, rank: int) -> bool:
        """Returns False when a stop request ended it early (after ``save``, which records the position)."""
        if self.done:
            return True
        from rich.progress import Progress

        t = self.cfg.train
        writer = MetricsWriter(out_dir / "tb" / "warm_start", enabled=rank == 0, tensorboard=self.cfg.logging.tensorboard,
                               keep_through=self.step - 1 if self.step else None)
        try:
            with Progress(disable=rank != 0) as progress:
                task = progress.add_task("warm start (supervised)", total=self.steps, completed=self.step)
                while self.step < self.steps:
                    i = self.step
                    # One RL step's worth of samples per warm-start step, whatever train.updates_per_batch is: the
                    # supervised start must not depend on how the RL batch is later split into updates (a
                    # divided batch left the updates_per_batch=4 cells of the study at zero accuracy).
                    problems = dp.share(stream.take(t.rollout_batch_size * t.group_size))
                    r = learner.sft_step([codec.sft_sample(p) for p in problems], lr=t.warm_start_lr)
                    guard.count(r.update_successful, 0)
                    self.step += 1
                    if rank == 0 and (i % 10 == 0 or i == self.steps - 1):
                        writer.scalars(i, {"warm_start/nll": r.metrics.get("loss", math.nan), "warm_start/grad_norm": r.grad_norm})
                    progress.advance(task)
                    if self.step < self.steps and stop.should_stop():
                        if rank == 0:
                            print(f"stop requested ({stop.reason}) during the warm start: saving at warm-start step "
                                  f"{self.step}", flush=True)
                        save()
                        return False
        finally:
            writer.close()
        learner.restore_scheduled_lr()
        self.done = True
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"warm_started": self.done, "warm_step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state["warm_started"])
        self.step = int(state.get("warm_step", self.steps if self.done else 0))

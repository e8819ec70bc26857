"""The supervised warm start: steps on reference answers so the reward is not zero when RL starts, on its
own TensorBoard step axis (tb/warm_start); stoppable and resumable at any step.

Two rules (config/warm_start.py): exactly ``train.warm_start_steps`` steps (the default), or, with
``train.warm_start_until_accuracy`` > 0, steps until the sampled accuracy reaches it, checked before step 0,
every ``train.warm_start_check_interval`` steps and at the cap ``train.warm_start_steps``
(train/warm_check.py). A check at step s measures the policy after s updates and is logged at step s of
the warm-start axis (``warm_start/sampled_accuracy``); reaching the cap without meeting the criterion is
said loudly (stdout, ``warm_start/cap_hit``, the run's summary.md)."""

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

Check = Callable[[PromptStream], float]


class WarmStart:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.steps = cfg.train.warm_start_steps  # the length, or the cap with a criterion
        self.goal = float(cfg.train.warm_start_until_accuracy)  # 0: no criterion
        self.step = 0  # warm-start updates done
        self.checks: list[tuple[int, float]] = []  # (updates done, sampled accuracy) of every check so far
        self.done = self.steps == 0

    # ---- the outcome (criterion runs) ----------------------------------------------------------------------
    @property
    def met(self) -> bool:
        return bool(self.checks) and self.checks[-1][1] >= self.goal

    @property
    def cap_hit(self) -> bool:
        """Finished at the cap without meeting the criterion."""
        return self.goal > 0 and self.done and not self.met

    def outcome(self) -> dict[str, float]:
        """What the RL log records at step 0 (criterion runs only; the fixed rule logs nothing new)."""
        if not self.goal or not self.done:
            return {}
        return {"warm_start/steps_taken": float(self.step), "warm_start/criterion_met": float(self.met),
                "warm_start/cap_hit": float(self.cap_hit),
                "warm_start/final_sampled_accuracy": self.checks[-1][1] if self.checks else math.nan}

    def _check_due(self) -> bool:
        if not self.goal or (self.checks and self.checks[-1][0] == self.step):
            return False
        return self.step % self.cfg.train.warm_start_check_interval == 0 or self.step >= self.steps

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, learner: Any, stream: PromptStream, codec: Codec, dp: DataParallel, guard: UpdateGuard,
            stop: StopRequest, save: Callable[[], Any], out_dir: Path, rank: int, check: Check | None = None) -> bool:
        """Returns False when a stop request ended it early (after ``save``, which records the position).
        ``check`` measures the criterion (train/warm_check.py); needed when it is on."""
        if self.done:
            return True
        if self.goal and check is None:
            raise ValueError("train.warm_start_until_accuracy is set but the warm start got no accuracy check")
        from rich.progress import Progress

        t = self.cfg.train
        writer = MetricsWriter(out_dir / "tb" / "warm_start", enabled=rank == 0, tensorboard=self.cfg.logging.tensorboard,
                               keep_through=self.step - 1 if self.step else None)
        try:
            with Progress(disable=rank != 0) as progress:
                task = progress.add_task("warm start (supervised)", total=self.steps, completed=self.step)
                while True:
                    if self._check_due():  # before the update: a resume at step s makes the check of step s
                        assert check is not None
                        value = check(stream)
                        self.checks.append((self.step, value))
                        if rank == 0:
                            writer.scalars(self.step, {"warm_start/sampled_accuracy": value})
                            print(f"warm start: step {self.step}, sampled accuracy {value:.4f} "
                                  f"(criterion >= {self.goal:g})", flush=True)
                        if value >= self.goal:
                            break
                    if self.step >= self.steps:
                        break
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
            if self.goal and rank == 0:
                writer.scalars(self.step, {"warm_start/steps_taken": float(self.step), "warm_start/cap_hit": float(not self.met)})
        finally:
            writer.close()
        learner.restore_scheduled_lr()
        self.done = True
        if self.goal and rank == 0:
            self._report()
        return True

    def _report(self) -> None:
        last = self.checks[-1][1] if self.checks else math.nan
        if self.met:
            print(f"warm start: criterion met (sampled accuracy {last:.4f} >= {self.goal:g}) after {self.step} of at most "
                  f"{self.steps} steps", flush=True)
            return
        bar = "!" * 100
        print(f"{bar}\nWARNING: the warm start hit its cap of train.warm_start_steps={self.steps} steps WITHOUT reaching "
              f"sampled accuracy >= {self.goal:g} (last check: {last:.4f}).\nThe RL that follows may have nothing to "
              f"learn from (zero reward, zero advantages); this run is flagged as cap_hit.\n{bar}", flush=True)

    # ---- checkpointed state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"warm_started": self.done, "warm_step": self.step, "warm_checks": [list(c) for c in self.checks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state["warm_started"])
        self.step = int(state.get("warm_step", self.steps if self.done else 0))
        self.checks = [(int(s), float(v)) for s, v in state.get("warm_checks", [])]

"""What one RL step reports: phase timings, rollout statistics over all DP ranks, the batch digest and
the token-age histogram, as one typed ``StepStats``."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from minpro_megatron.learner.batch import TrainSample
from minpro_megatron.parallel.reduce import all_reduce_sum
from minpro_megatron.rollout.buffer import token_age_histogram
from minpro_megatron.train.groups import Group

__all__ = ["PhaseTimer", "StepStats", "rollout_metrics", "batch_digest", "mean_dicts"]


class PhaseTimer:
    """``with timer("train"): ...`` adds the block's wall time to ``timer.seconds["train"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class StepStats:
    """Scalars for TensorBoard (``metrics``) and the token-age histogram of the step's batch."""

    metrics: dict[str, float] = field(default_factory=dict)
    token_ages: dict[int, int] = field(default_factory=dict)


def rollout_metrics(groups: Sequence[Group], consumed_at: int, dp_group: Any, dp_size: int) -> tuple[dict[str, float], dict[int, int]]:
    """Reward, accuracy, length and staleness of the batch trained at RL step ``consumed_at`` (over all
    DP ranks), and this rank's token-age histogram."""
    rewards = [r for g in groups for r in g.rewards]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    versions = [v for g in groups for s in g.samples for v in s.weight_versions]
    local = torch.tensor(
        [sum(rewards), sum(r * r for r in rewards), len(rewards), sum(1.0 for r in rewards if r >= 1.0),
         sum(lengths), sum(consumed_at - v for v in versions), len(versions), sum(1 for g in groups if len(set(g.rewards)) == 1),
         len(groups), sum(1 for g in groups for s in g.samples if len(set(s.weight_versions)) > 1)],
        dtype=torch.float64,
    )
    t = all_reduce_sum(local, dp_group).tolist()
    n = max(t[2], 1.0)
    mean = t[0] / n
    out = {
        "rollout/reward_mean": mean,
        "rollout/reward_std": math.sqrt(max(t[1] / n - mean * mean, 0.0)),
        "rollout/accuracy": t[3] / n,
        "rollout/response_length": t[4] / n,
        "rollout/staleness_mean": t[5] / max(t[6], 1.0),
        "rollout/zero_adv_group_frac": t[7] / max(len(groups) * dp_size, 1),
        "rollout/prompts": t[8],  # counted: a prompt lost or answered twice (retries, restarts) shows here
        "rollout/samples": t[2],
        "rollout/multi_version_samples": t[9],  # responses with tokens of several versions (rollout.partial)
    }
    return out, token_age_histogram(versions, consumed_at)


def batch_digest(samples: Sequence[TrainSample], dp_group: Any) -> float:
    """A digest of the trained tokens of all DP ranks (equal batches -> equal digests): makes "the resumed
    run trains on the same batch" checkable from the logs."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.tokens.numpy().tobytes())
        h.update(s.old_logp.numpy().tobytes())
    local = torch.tensor([int(h.hexdigest()[:7], 16)], dtype=torch.float64)  # 28 bits: exact after a sum
    return float(all_reduce_sum(local, dp_group))


def mean_dicts(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    if not dicts:
        return {}
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


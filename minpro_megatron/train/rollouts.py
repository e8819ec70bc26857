"""Rollouts of the RL loop: this rank's share of the prompts through the engine, then rewards and GRPO
group advantages, with the generation time and token count as typed stats."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from minpro_megatron.advantages import group_advantages
from minpro_megatron.data.tasks import Problem
from minpro_megatron.rewards import reward
from minpro_megatron.rollout.engine import PendingRollout, RolloutEngine
from minpro_megatron.rollout.types import SampleGroup, SamplingParams
from minpro_megatron.train.dp import DataParallel
from minpro_megatron.train.groups import Group
from minpro_megatron.train.tokens import Codec

__all__ = ["RolloutStats", "StartedRollout", "Rollouts"]


@dataclass
class RolloutStats:
    generate_s: float = 0.0  # generation time (with SGLang rank 0's; overlapped generation included)
    wait_s: float = 0.0  # time the loop waited for finished generations (the part not overlapped)
    tokens: int = 0  # response tokens generated on this rank
    retries: int = 0  # requests sent again after a failure (SGLang: rank 0's)

    def __add__(self, other: "RolloutStats") -> "RolloutStats":
        return RolloutStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class StartedRollout:
    pending: PendingRollout
    problems: list[Problem]


class Rollouts:
    def __init__(self, engine: RolloutEngine, codec: Codec, sampling: SamplingParams, dp: DataParallel,
                 strict_format: bool, advantage_eps: float) -> None:
        self.engine, self.codec, self.sampling, self.dp = engine, codec, sampling, dp
        self.strict_format, self.advantage_eps = strict_format, advantage_eps

    def start(self, problems: Sequence[Problem], shard: bool = True) -> StartedRollout:
        """Start generating this rank's share of ``problems`` (all of them if not ``shard``); collective."""
        mine = self.dp.share(problems) if shard else list(problems)
        return StartedRollout(self.engine.start([self.codec.prompt(p) for p in mine], self.sampling), mine)

    def finish(self, started: StartedRollout) -> tuple[list[Group], RolloutStats]:
        """Collect the samples, score them and normalise advantages within each group; collective."""
        t0 = time.perf_counter()
        groups_samples = self.engine.finish(started.pending)
        wait_s = time.perf_counter() - t0
        groups = []
        for problem, samples in zip(started.problems, groups_samples):
            rewards = [reward(problem.data_source, self.codec.response_text(s.response_ids), problem.answer, self.strict_format)
                       for s in samples]
            groups.append(Group(problem, SampleGroup(samples), rewards, group_advantages(rewards, self.advantage_eps)))
        tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
        return groups, RolloutStats(started.pending.seconds, wait_s, tokens, started.pending.retries)

    def run(self, problems: Sequence[Problem], shard: bool = True) -> tuple[list[Group], RolloutStats]:
        return self.finish(self.start(problems, shard))

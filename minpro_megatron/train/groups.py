"""A scored group: the G responses of one prompt with their rewards and group advantages (the unit the
batch source buffers, checkpoints and hands to the learner)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from minpro_megatron.data.tasks import Problem
from minpro_megatron.learner.batch import TrainSample
from minpro_megatron.rollout.types import RolloutSample, SampleGroup, WeightVersionSpan

__all__ = ["Group", "train_sample", "train_samples"]


@dataclasses.dataclass
class Group:
    problem: Problem
    samples: SampleGroup
    rewards: list[float]
    advantages: list[float]

    @property
    def min_version(self) -> int:
        return self.samples.min_version

    @property
    def max_version(self) -> int:
        return self.samples.max_version

    def to_state(self) -> dict:
        return {
            "problem": dataclasses.asdict(self.problem),
            "samples": [dataclasses.asdict(s) for s in self.samples],
            "rewards": self.rewards,
            "advantages": self.advantages,
        }

    @staticmethod
    def from_state(state: dict) -> "Group":
        samples = SampleGroup()
        for s in state["samples"]:
            s = dict(s)
            s["version_spans"] = [WeightVersionSpan(**v) for v in s.get("version_spans", [])]
            samples.append(RolloutSample(**s))
        return Group(Problem(**state["problem"]), samples, list(state["rewards"]), list(state["advantages"]))


def train_sample(s: RolloutSample, advantage: float) -> TrainSample:
    """One response with tokens as the learner's sample (behaviour log-probs as pi_old)."""
    return TrainSample(torch.tensor(s.prompt_ids + s.response_ids), len(s.prompt_ids), torch.tensor(s.logprobs),
                       advantage, version=s.min_version, routed_experts=s.routed_experts)


def train_samples(groups: Sequence[Group]) -> list[TrainSample]:
    """The learner's samples (empty responses carry no tokens to train on and are left out)."""
    return [train_sample(s, adv) for g in groups for s, adv in zip(g.samples, g.advantages) if s.response_ids]

"""Grading generated answers, shared by the trainer's held-out evaluation (greedy pass@1, ``eval/accuracy``)
and ``minpro-eval`` (pass@k over n samples, eval/passk.py): one rule for decoding (cut at the first EOS)
and for correctness (reward >= 1)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from minpro_megatron.data.tasks import Problem
from minpro_megatron.rewards import reward
from minpro_megatron.rollout.engine import RolloutEngine
from minpro_megatron.rollout.types import SamplingParams
from minpro_megatron.train.dp import DataParallel
from minpro_megatron.train.tokens import Codec

__all__ = ["correct_counts", "greedy_accuracy"]


def correct_counts(engine: RolloutEngine, problems: Sequence[Problem], params: SamplingParams, codec: Codec,
                   dp: DataParallel, strict_format: bool) -> list[int]:
    """For every problem, how many of its ``params.n`` samples are correct (on every rank; collective).
    The list is padded to the DP size with copies whose counts are dropped."""
    n_real = len(problems)
    padded = list(problems) + list(problems[: (-n_real) % dp.size])
    mine = padded[dp.rank :: dp.size]
    groups = engine.generate([codec.prompt(p) for p in mine], params)
    counts = [sum(reward(p.data_source, codec.response_text(s.response_ids), p.answer, strict_format) >= 1.0 for s in g)
              for p, g in zip(mine, groups)]
    local = torch.zeros(len(padded), dtype=torch.float64)
    local[torch.arange(dp.rank, len(padded), dp.size)[: len(counts)]] = torch.tensor(counts, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(local, group=dp.group)
    return [int(x) for x in local.tolist()[:n_real]]


def greedy_accuracy(engine: RolloutEngine, problems: Sequence[Problem], sampling: SamplingParams, codec: Codec,
                    dp: DataParallel, strict_format: bool) -> float:
    """Greedy pass@1 over ``problems``."""
    greedy = dataclasses.replace(sampling, temperature=0.0, n=1)
    counts = correct_counts(engine, problems, greedy, codec, dp, strict_format)
    return sum(counts) / max(len(counts), 1)

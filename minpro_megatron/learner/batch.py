"""Training samples and their packing into CP-local THD micro-batches.

A sample is one prompt + response. The learner scores position t with log p(tokens[t+1]) (labels are
shifted inside each sequence before the CP split), so a response token i (tokens[P + i]) is scored at
position P - 1 + i: that is where its behaviour log-prob, advantage and loss mask go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from minpro_megatron.learner.logprobs import PackedInputs, prepare_packed_inputs
from minpro_megatron.losses.common import BatchTotals
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.reduce import all_reduce_sum

__all__ = ["TrainSample", "MicroBatch", "pack_micro_batch", "split_micro_batches", "global_batch_totals"]


@dataclass
class TrainSample:
    """One prompt + response with its behaviour log-probs and advantage.

    tokens: prompt then response ids. old_logp: behaviour log-prob of each response token.
    loss_mask: which response tokens are trained (default: all). ref_logp: reference-policy log-probs of
    the response tokens (only for a KL term). version: weight version that generated the sample.
    rollout_logp: the server's log-probs of the response tokens when old_logp was recomputed by the
    learner (loss.old_logp=recompute); the mismatch correction compares the two (losses/mismatch.py).
    routed_experts: the rollout's expert choices [N, MoE layers, top-k] (N = tokens or tokens - 1) for
    rollout.routing_replay (learner/routing_replay.py).
    """

    tokens: torch.Tensor
    prompt_len: int
    old_logp: torch.Tensor
    advantage: float
    loss_mask: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    version: int = 0
    meta: dict = field(default_factory=dict)
    rollout_logp: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.int64).reshape(-1)
        n_resp = self.response_len
        if self.prompt_len < 1 or n_resp < 1:
            raise ValueError(
                f"TrainSample needs a prompt of >= 1 token and a response of >= 1 token; got prompt_len="
                f"{self.prompt_len} with {self.tokens.numel()} tokens"
            )
        self.old_logp = torch.as_tensor(self.old_logp, dtype=torch.float32).reshape(-1)
        if self.old_logp.numel() != n_resp:
            raise ValueError(
                f"TrainSample.old_logp has {self.old_logp.numel()} values for {n_resp} response tokens"
            )
        if self.loss_mask is None:
            self.loss_mask = torch.ones(n_resp, dtype=torch.bool)
        self.loss_mask = torch.as_tensor(self.loss_mask, dtype=torch.bool).reshape(-1)
        if self.loss_mask.numel() != n_resp:
            raise ValueError(f"TrainSample.loss_mask has {self.loss_mask.numel()} values for {n_resp} response tokens")
        if self.ref_logp is not None:
            self.ref_logp = torch.as_tensor(self.ref_logp, dtype=torch.float32).reshape(-1)
            if self.ref_logp.numel() != n_resp:
                raise ValueError(f"TrainSample.ref_logp has {self.ref_logp.numel()} values for {n_resp} response tokens")
        if self.rollout_logp is not None:
            self.rollout_logp = torch.as_tensor(self.rollout_logp, dtype=torch.float32).reshape(-1)
            if self.rollout_logp.numel() != n_resp:
                raise ValueError(
                    f"TrainSample.rollout_logp has {self.rollout_logp.numel()} values for {n_resp} response tokens"
                )

        if self.routed_experts is not None:
            r = self.routed_experts = torch.as_tensor(self.routed_experts)
            n = self.tokens.numel()
            if r.dim() != 3 or r.shape[0] not in (n - 1, n) or r.is_floating_point():
                raise ValueError(
                    f"TrainSample.routed_experts must be an integer tensor [tokens or tokens - 1, MoE layers, top-k]; "
                    f"got {r.dtype} {tuple(r.shape)} for {n} tokens"
                )

    @property
    def response_len(self) -> int:
        return int(self.tokens.numel()) - self.prompt_len

    @property
    def num_trained(self) -> int:
        return int(self.loss_mask.sum())

    def positional(self, values: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """Response-aligned values -> one per position (position P - 1 + i scores response token i)."""
        out = torch.full((self.tokens.numel(),), fill, dtype=values.dtype)
        out[self.prompt_len - 1 : self.prompt_len - 1 + self.response_len] = values
        return out


@dataclass
class MicroBatch:
    inputs: PackedInputs
    old_logp: torch.Tensor  # [T_local] float32
    advantages: torch.Tensor  # [T_local] float32
    mask: torch.Tensor  # [T_local] bool
    ref_logp: torch.Tensor | None
    samples: list[TrainSample]
    rollout_logp: torch.Tensor | None = None  # [T_local] float32, when the samples carry it
    routing: torch.Tensor | None = None  # [T_local, MoE layers, top-k] int64 replayed routing, when the samples carry it

    @property
    def layout(self) -> ZigzagLayout:
        return self.inputs.layout


def pack_micro_batch(
    samples: Sequence[TrainSample],
    *,
    cp_size: int = 1,
    cp_rank: int = 0,
    cp_group: dist.ProcessGroup | None = None,
    dp_cp_group: dist.ProcessGroup | None = None,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    device: torch.device | str = "cpu",
) -> MicroBatch:
    """Pack samples into this CP rank's zigzag slice with per-position loss inputs."""
    samples = list(samples)
    if not samples:
        raise ValueError("pack_micro_batch: empty micro-batch")
    layout = ZigzagLayout(
        torch.tensor([s.tokens.numel() for s in samples]),
        cp_size=cp_size,
        cp_rank=cp_rank,
        cp_group=cp_group,
        dp_cp_group=dp_cp_group,
        pad_multiple=tp_size * cp_size if sequence_parallel else 1,
    )
    inputs = prepare_packed_inputs(
        [s.tokens for s in samples], layout, device=device, tp_size=tp_size, sequence_parallel=sequence_parallel
    )

    def local(values: list[torch.Tensor], fill: float | bool) -> torch.Tensor:
        return layout.split(layout.pad(torch.cat(values), fill)).to(device)

    old = local([s.positional(s.old_logp, 0.0) for s in samples], 0.0)
    adv = local([torch.full((s.tokens.numel(),), float(s.advantage)) for s in samples], 0.0)
    mask = local([s.positional(s.loss_mask, False) for s in samples], False)
    ref = None
    if any(s.ref_logp is not None for s in samples):
        if not all(s.ref_logp is not None for s in samples):
            raise ValueError("pack_micro_batch: ref_logp must be given for every sample of a micro-batch or none")
        ref = local([s.positional(s.ref_logp, 0.0) for s in samples], 0.0)
    rollout = None
    if any(s.rollout_logp is not None for s in samples):
        if not all(s.rollout_logp is not None for s in samples):
            raise ValueError("pack_micro_batch: rollout_logp must be given for every sample of a micro-batch or none")
        rollout = local([s.positional(s.rollout_logp, 0.0) for s in samples], 0.0)
    routing = None
    if any(s.routed_experts is not None for s in samples):
        if not all(s.routed_experts is not None for s in samples):
            raise ValueError("pack_micro_batch: routed_experts must be given for every sample of a micro-batch or none")
        from minpro_megatron.learner.routing_replay import pack_routing

        routing = pack_routing([s.routed_experts for s in samples], layout, int(samples[0].routed_experts.shape[2]))
    return MicroBatch(inputs, old, adv, mask & inputs.label_mask, ref, samples, rollout, routing)


def split_micro_batches(samples: Sequence[TrainSample], micro_batch_size: int) -> list[list[TrainSample]]:
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size must be >= 1, got {micro_batch_size}")
    samples = list(samples)
    if len(samples) % micro_batch_size:
        raise ValueError(
            f"{len(samples)} samples on this data-parallel rank are not divisible by train.micro_batch_size="
            f"{micro_batch_size}: every rank needs the same number of micro-batches"
        )
    return [samples[i : i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]


def global_batch_totals(shard: Sequence[TrainSample], dp_group: dist.ProcessGroup | None) -> BatchTotals:
    """Trained tokens and trained sequences of the whole step (all DP shards): the loss normaliser."""
    local = torch.tensor(
        [sum(s.num_trained for s in shard), sum(1 for s in shard if s.num_trained > 0)], dtype=torch.float64
    )
    total = all_reduce_sum(local, dp_group)
    return BatchTotals(float(total[0]), float(total[1]))

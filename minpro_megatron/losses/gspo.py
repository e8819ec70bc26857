"""GSPO: sequence-level geometric-mean ratio with sequence-level clipping.

    s_i = exp(mean_t log r_t over the response of o_i),  L_i = -min(s_i A_i, clip(s_i, 1-eps_l, 1+eps_h) A_i)

A_i is the mean advantage over the sequence's trained tokens (GRPO advantages are constant per
sequence, so this is the advantage itself). The loss is sum_i W_i L_i where W_i is the total aggregation
weight of the sequence's tokens, so token-mean weighs sequences by length and seq-mean-token-mean gives
the GSPO paper's 1/G sum_i.

Under context parallelism the mean spans every CP chunk: the per-sequence sums come from one CP
exchange, and the gradient is re-attached locally -- log s_i = sg(global mean) + (local sum -
sg(local sum)) / n_i -- so d s_i / d logp_t = s_i / n_i on every rank without backward communication.
Each rank carries the whole gradient of L_i but only its token share of the value.

With ``mismatch_correction=tis`` L_i is multiplied by c_i = sg[min(exp(mean_t log m_t), C)], the
truncated geometric mean of the sequence's mismatch ratios m_t = pi_old / pi_rollout, whose sum comes
from the same CP exchange (losses/mismatch.py); ``mask`` drops tokens before the means.
"""

from __future__ import annotations

import math

import torch

from minpro_megatron.losses.base import LossContext
from minpro_megatron.losses.common import PolicyInputs
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.losses.mismatch import tis_factor
from minpro_megatron.parallel.cp_scan import ScanRequest

__all__ = ["GSPOLoss", "sequence_weights"]


def sequence_weights(ctx: LossContext, n: torch.Tensor) -> torch.Tensor:
    """Total aggregation weight W_i of each sequence's n_i tokens (all CP chunks)."""
    agg = ctx.cfg.aggregation
    if agg == "token-mean":
        assert isinstance(ctx.weights, float)
        return n * ctx.weights
    n_seqs = max((ctx.norm_totals.num_seqs), 1.0)
    if agg == "seq-mean-token-mean":
        return torch.full_like(n, 1.0 / n_seqs)
    return n / n_seqs  # seq-mean-token-sum


class GSPOLoss:
    name = "gspo"
    sequence_level = True  # TIS: one factor per sequence (losses/mismatch.py)

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        requests = {
            "log_ratio_sum": ScanRequest(inputs.log_ratio_detached, "sum"),
            "adv_sum": ScanRequest(inputs.advantages, "sum"),
        }
        if cfg.mismatch_correction == "tis":
            assert inputs.mismatch_log_ratio is not None
            requests["mismatch_sum"] = ScanRequest(inputs.mismatch_log_ratio, "sum")
        return requests

    def needs_counts(self, cfg: LossConfig) -> bool:
        return True  # sequence lengths n_i

    def loss(self, ctx: LossContext) -> torch.Tensor:
        x, bag = ctx.inputs, ctx.bag
        eps_low, eps_high = ctx.cfg.clip_range()
        dtype = x.log_ratio.dtype
        seq_of_tok = x.layout.local_seq_ids.to(x.valid.device)
        lr_scan, adv_scan = ctx.scans["log_ratio_sum"], ctx.scans["adv_sum"]
        n = lr_scan.seq_count.to(dtype)
        has_tokens = lr_scan.seq_count > 0
        n_safe = n.clamp_min(1.0)

        local_sum = torch.zeros(x.layout.num_seqs, dtype=dtype, device=x.log_ratio.device).index_add(
            0, seq_of_tok, x.log_ratio  # already 0 on invalid tokens
        )
        global_mean = lr_scan.seq_total.to(dtype) / n_safe
        log_s = global_mean + (local_sum - local_sum.detach()) / n_safe
        s = torch.exp(log_s)
        adv = adv_scan.seq_total.to(dtype) / n_safe

        unclipped = -adv * s
        clipped = -adv * s.clamp(1.0 - eps_low, 1.0 + eps_high)
        seq_loss = torch.maximum(unclipped, clipped)
        if ctx.cfg.mismatch_correction == "tis":  # c_i = sg[min(geomean_t m_t, C)]: one CP exchange, exact
            log_m = ctx.scans["mismatch_sum"].seq_total.to(dtype) / n_safe
            c = tis_factor(log_m, ctx.cfg.mismatch_tis_cap)
            seq_loss = seq_loss * c
            counted_tok = x.valid
            bag.mean("mismatch_is_mean", c[seq_of_tok], counted_tok)
            bag.frac("mismatch_truncated_frac", counted_tok & (log_m > math.log(ctx.cfg.mismatch_tis_cap))[seq_of_tok], "num_tokens")

        seq_weight = sequence_weights(ctx, n)
        full = torch.where(has_tokens, seq_weight * seq_loss, torch.zeros_like(seq_loss))
        local_n = torch.zeros_like(n).index_add(0, seq_of_tok, x.valid.to(dtype))
        value_share = full.detach() * local_n / n_safe
        loss = (value_share + (full - full.detach())).sum()

        clip_active = (clipped > unclipped).detach() & has_tokens
        tok_clip = clip_active[seq_of_tok] & x.valid
        s_tok = s.detach()[seq_of_tok]
        bag.frac("clip_frac_high", tok_clip & (s_tok > 1.0), "num_tokens")
        bag.frac("clip_frac_low", tok_clip & (s_tok < 1.0), "num_tokens")
        # Sequence statistics are counted once per sequence (on CP rank 0).
        counted = has_tokens if x.layout.cp_rank == 0 else torch.zeros_like(has_tokens)
        bag.mean("seq_ratio_mean", s, counted)
        bag.min("seq_ratio_min", s, counted)
        bag.max("seq_ratio_max", s, counted)
        return loss

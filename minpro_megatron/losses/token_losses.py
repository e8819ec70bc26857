"""Token-level baselines: GRPO (PPO-clip), CISPO and M2PO."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from minpro_megatron.losses.base import LossContext, per_token_share
from minpro_megatron.losses.common import PolicyInputs, log_clip_bounds
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.parallel.cp_scan import ScanRequest
from minpro_megatron.parallel.reduce import largest_true, ordered_bits_to_float32
from minpro_megatron.parallel.segmented import float32_ordered_bits

__all__ = ["GRPOLoss", "CISPOLoss", "M2POLoss", "m2po_keep_mask"]


class GRPOLoss:
    """PPO-clip per token: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), DAPO clip-higher by default;
    dual-clip bounds the loss of negative-advantage tokens by -c A; log_ratio_clamp bounds log r before exp
    (as verl does); optional k3 KL to a reference policy
    (kl_coef * (exp(ref - logp) - (ref - logp) - 1), gradient through logp)."""

    name = "grpo"
    sequence_level = False

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        return {}

    def needs_counts(self, cfg: LossConfig) -> bool:
        return False

    def loss(self, ctx: LossContext) -> torch.Tensor:
        x, cfg, bag = ctx.inputs, ctx.cfg, ctx.bag
        eps_low, eps_high = cfg.clip_range()
        log_ratio = x.log_ratio if cfg.log_ratio_clamp is None else x.log_ratio.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        ratio = torch.exp(log_ratio)
        adv = x.advantages
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        per_token = torch.maximum(unclipped, clipped)
        clip_active = clipped.detach() > unclipped.detach()  # never on invalid tokens (adv = 0 there)
        high = x.log_ratio_detached > 0
        bag.frac("clip_frac_high", clip_active & high, "num_tokens")
        bag.frac("clip_frac_low", clip_active & ~high, "num_tokens")
        if cfg.dual_clip is not None:
            bound = -adv * cfg.dual_clip
            dual = (adv < 0) & (bound < per_token.detach())
            per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
            bag.frac("dual_clip_frac", dual, "num_tokens")
        if cfg.kl_coef > 0:
            if ctx.ref_logp is None:
                raise ValueError("loss.kl_coef > 0 needs ref_logp (log-probs of the reference policy)")
            delta = torch.where(x.valid, ctx.ref_logp.to(x.logp.dtype) - x.logp, 0.0)
            kl = torch.expm1(delta) - delta
            per_token = per_token + cfg.kl_coef * kl
            bag.mean("kl_ref_k3", kl, x.valid)
        return per_token_share(ctx, per_token)


class CISPOLoss:
    """sg[clip(r, 1-eps_low, 1+eps_high)] * A * log pi: every token keeps a gradient, bounded in size."""

    name = "cispo"
    sequence_level = False

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        return {}

    def needs_counts(self, cfg: LossConfig) -> bool:
        return False

    def loss(self, ctx: LossContext) -> torch.Tensor:
        x = ctx.inputs
        eps_low, eps_high = ctx.cfg.clip_range()
        weight = torch.exp(x.log_ratio_detached).clamp_(1.0 - eps_low, 1.0 + eps_high)
        add_weight_clip_metrics(ctx, x.log_ratio_detached)
        return per_token_share(ctx, -weight * x.advantages * x.logp)


def add_weight_clip_metrics(ctx: LossContext, log_raw_weight: torch.Tensor) -> None:
    """Fractions of trained tokens whose (unclipped) weight lies above / below the clip range."""
    log_lo, log_hi = log_clip_bounds(ctx.cfg)
    v = ctx.inputs.valid
    ctx.bag.frac("clip_frac_high", v & (log_raw_weight > log_hi), "num_tokens")
    ctx.bag.frac("clip_frac_low", v & (log_raw_weight < log_lo), "num_tokens")


def m2po_keep_mask(
    m2: torch.Tensor, valid: torch.Tensor, tau: float, group: "dist.ProcessGroup | None"
) -> tuple[torch.Tensor, float]:
    """Keep the tokens with M2 <= v*, where v* is the largest value such that the mean M2 of the kept
    tokens (over the whole batch, all ranks of ``group``) is <= tau. Equivalent to dropping the largest-M2
    tokens until the kept mean falls to tau; tied values are kept or dropped together, so the mask does
    not depend on how the batch is split. Exact: a search over float32 bit patterns with all_reduced
    (sum, count) pairs, no gather of token values."""
    vals = m2.detach().float()[valid]
    lo = int(float32_ordered_bits(torch.tensor([0.0]))[0])  # keeping only zeros is always allowed
    hi = int(float32_ordered_bits(torch.tensor([math.inf]))[0])
    best = largest_true(float32_ordered_bits(vals), vals, lo, hi, lambda c, s: s <= tau * c, group)
    threshold = ordered_bits_to_float32(best)
    return valid & (m2.detach().float() <= threshold), threshold


class M2POLoss:
    """M2PO: mask tokens by the global second moment M2 = (log r)^2 (see m2po_keep_mask), then an
    unclipped importance-weighted objective -mask * r * A."""

    name = "m2po"
    sequence_level = False

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        return {}

    def needs_counts(self, cfg: LossConfig) -> bool:
        return False

    def loss(self, ctx: LossContext) -> torch.Tensor:
        x, bag = ctx.inputs, ctx.bag
        m2 = x.log_ratio_detached.square()
        keep, _ = m2po_keep_mask(m2, x.valid, ctx.cfg.m2po_tau, x.layout.dp_cp_group)
        ratio = torch.exp(x.log_ratio)
        per_token = torch.where(keep, -ratio * x.advantages, 0.0)
        bag.frac("m2po_masked_frac", x.valid & ~keep, "num_tokens")
        bag.frac("clip_frac_high", x.valid & ~keep & (x.log_ratio_detached > 0), "num_tokens")
        bag.frac("clip_frac_low", x.valid & ~keep & (x.log_ratio_detached < 0), "num_tokens")
        bag.max("m2po_threshold", m2, keep)  # the largest kept M2 (the search bound lies just below the next value)
        bag.mean("m2_mean", m2, x.valid)
        bag.mean("m2_kept_mean", m2, keep)
        return per_token_share(ctx, per_token)

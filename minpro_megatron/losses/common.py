"""What every policy loss shares: input checks, the global normaliser, aggregation and common metrics.

Conventions (all losses):
- Inputs are 1-D, CP-local, in the layout's token order: ``logp`` (current policy, with grad),
  ``old_logp`` (behaviour policy), ``advantages`` (per token, usually the sequence's advantage repeated),
  ``mask`` (True for trained response tokens). Tokens of one sequence must be in sequence order; whether
  position t holds log p(token t) or log p(token t+1) does not matter as long as all inputs agree.
- Tokens whose log-ratio or advantage is not finite are dropped from the loss and the statistics and
  counted in the ``nonfinite_count`` metric; all-masked sequences contribute nothing.
- The returned loss is this rank's *share* of the global objective: summing it over all DP x CP ranks
  (and over micro-batches, when ``totals`` describes the whole batch) gives the global loss, and its
  gradient w.r.t. local ``logp`` is exactly the global loss's gradient. Losses are minimised (loss = -J).
- Metrics are global over ``layout.dp_cp_group`` for this call.
- float32 inputs are computed in float32 (sums accumulate in float64); float64 inputs stay float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minpro_megatron.config.loss import LossConfig
from minpro_megatron.losses.mismatch import mask_band_keep
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.cp_scan import ScanRequest, ScanResult, cp_segmented_scans
from minpro_megatron.parallel.reduce import MetricBag, all_reduce_sum, global_kth_smallest

__all__ = [
    "BatchTotals",
    "PolicyInputs",
    "prepare_inputs",
    "batch_totals",
    "token_weights",
    "aggregate",
    "add_common_metrics",
    "add_prefix_metrics",
    "run_scans",
    "exclusive_log_prefix_min",
    "log_clip_bounds",
]


@dataclass(frozen=True)
class BatchTotals:
    """Global normalisers of one optimizer step: trained tokens and sequences with >= 1 trained token,
    over all DP x CP ranks and all micro-batches. Pass them to every micro-batch's loss call."""

    num_tokens: float
    num_seqs: float


@dataclass
class PolicyInputs:
    logp: torch.Tensor  # carries the gradient; 0 where invalid
    log_ratio: torch.Tensor  # logp - old_logp, 0 where invalid, carries the gradient
    advantages: torch.Tensor  # 0 where invalid
    valid: torch.Tensor  # bool: mask & finite & not CP padding
    nonfinite: torch.Tensor  # int64 scalar: masked tokens dropped for a non-finite log-ratio/advantage
    layout: ZigzagLayout
    # Train-inference mismatch (losses/mismatch.py), only with a correction: log(pi_old / pi_rollout),
    # detached, 0 where invalid; and the number of finite tokens the mismatch mask dropped.
    mismatch_log_ratio: torch.Tensor | None = None
    mismatch_masked: torch.Tensor | None = None

    @property
    def log_ratio_detached(self) -> torch.Tensor:
        return self.log_ratio.detach()


def prepare_inputs(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    layout: ZigzagLayout,
    rollout_logp: torch.Tensor | None = None,
    keep_band: tuple[float, float] | None = None,
) -> PolicyInputs:
    """``rollout_logp`` (with a mismatch correction): the server's log-probs; a non-finite one drops the
    token like a non-finite ratio. ``keep_band``: the mismatch mask's [low, high] band of pi_old/pi_rollout."""
    n = layout.local_len
    named = [("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)]
    if rollout_logp is not None:
        named.append(("rollout_logp", rollout_logp))
    for name, t in named:
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"policy loss: {name} must be 1-D with {n} tokens (the layout's local length on CP rank "
                f"{layout.cp_rank}), got shape {tuple(t.shape)}"
            )
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    mask = mask.to(torch.bool)
    if layout.has_padding:
        mask = mask & layout.local_valid.to(mask.device)
    logp = logp.to(dtype)
    adv = advantages.detach().to(dtype)
    raw_ratio = logp - old_logp.detach().to(dtype)
    finite = torch.isfinite(raw_ratio.detach() + adv)  # one test for both (inf + x and nan + x stay non-finite)
    mm_ratio = masked = None
    if rollout_logp is not None:
        mm_ratio = old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype)
        finite = finite & torch.isfinite(mm_ratio)
    valid = mask & finite
    nonfinite = mask.sum() - valid.sum()
    if keep_band is not None:
        assert mm_ratio is not None, "the mismatch mask needs rollout_logp"
        kept = valid & mask_band_keep(torch.where(valid, mm_ratio, 0.0), *keep_band)
        masked = valid.sum() - kept.sum()
        valid = kept
    # Sanitise before any exp(): where() routes zero gradient to dropped tokens, and their inputs never
    # reach a NaN-producing op, so the backward stays finite too.
    return PolicyInputs(
        logp=torch.where(valid, logp, 0.0),
        log_ratio=torch.where(valid, raw_ratio, 0.0),
        advantages=torch.where(valid, adv, 0.0),
        valid=valid,
        nonfinite=nonfinite,
        layout=layout,
        mismatch_log_ratio=torch.where(valid, mm_ratio, 0.0) if mm_ratio is not None else None,
        mismatch_masked=masked,
    )


def run_scans(
    inputs: PolicyInputs, requests: list[ScanRequest], cfg: LossConfig, with_counts: bool
) -> list[ScanResult] | None:
    """One CP exchange for everything a loss needs (None when nothing needs it). Aggregations other than
    token-mean need per-sequence token counts across CP chunks, so they force counts."""
    with_counts = with_counts or cfg.aggregation != "token-mean"
    if not requests and not with_counts:
        return None
    return cp_segmented_scans(requests, inputs.valid, inputs.layout, with_counts=with_counts)


def batch_totals(inputs: PolicyInputs, seq_count: torch.Tensor | None) -> BatchTotals:
    """Global trained-token and sequence counts of this call (one all_reduce over DP x CP)."""
    layout = inputs.layout
    local_tokens = inputs.valid.sum().double()
    if seq_count is None:
        local_seqs = torch.tensor(math.nan, dtype=torch.float64, device=local_tokens.device)
    elif layout.cp_rank == 0:  # every CP rank sees every sequence: count them once
        local_seqs = (seq_count > 0).sum().double()
    else:
        local_seqs = torch.zeros((), dtype=torch.float64, device=local_tokens.device)
    t = all_reduce_sum(torch.stack([local_tokens, local_seqs.to(local_tokens.device)]), layout.dp_cp_group)
    return BatchTotals(float(t[0]), float(t[1]))


def token_weights(
    inputs: PolicyInputs, cfg: LossConfig, totals: BatchTotals, seq_count: torch.Tensor | None
) -> torch.Tensor | float:
    """w_t such that the aggregated loss is sum_t w_t * l_t over the global batch. token-mean: the scalar
    1/N (per-token losses are 0 on invalid tokens); otherwise a per-token tensor (0 on invalid tokens)."""
    if cfg.aggregation == "token-mean":
        return 1.0 / max(totals.num_tokens, 1.0)
    if seq_count is None:
        raise ValueError(f"loss.aggregation={cfg.aggregation!r} needs per-sequence counts (internal error)")
    dtype = inputs.log_ratio.dtype
    valid = inputs.valid.to(dtype)
    n_seq = max(totals.num_seqs, 1.0)
    if cfg.aggregation == "seq-mean-token-sum":
        return valid / n_seq
    if cfg.aggregation == "seq-mean-token-mean":
        per_seq_len = seq_count.to(dtype).clamp_min(1.0)[inputs.layout.local_seq_ids.to(valid.device)]
        return valid / (per_seq_len * n_seq)
    raise ValueError(f"unknown loss.aggregation {cfg.aggregation!r}")


def aggregate(per_token: torch.Tensor, weights: torch.Tensor | float) -> torch.Tensor:
    """This rank's share of the aggregated loss. ``per_token`` must be 0 on invalid tokens."""
    if isinstance(weights, float):
        return per_token.sum() * weights
    return (per_token * weights).sum()


def exclusive_log_prefix_min(scan: ScanResult, first_value: float = 1.0) -> torch.Tensor:
    """log of rho_min_t = min_{i<t} rho_i over the sequence's valid tokens; log(first_value) when empty
    (valid log-ratios are finite, so an empty prefix is exactly the neutral +inf)."""
    return scan.exclusive.masked_fill(scan.exclusive == math.inf, math.log(first_value))


def log_clip_bounds(cfg: LossConfig) -> tuple[float, float]:
    """log(1 - eps_low) (-inf when there is no lower bound) and log(1 + eps_high)."""
    eps_low, eps_high = cfg.clip_range()
    return (math.log(1.0 - eps_low) if eps_low < 1.0 else -math.inf), math.log1p(eps_high)


def add_common_metrics(bag: MetricBag, inputs: PolicyInputs, totals: BatchTotals) -> None:
    """Token-ratio statistics, approximate KL to the behaviour policy and bookkeeping counts."""
    v = inputs.valid
    lr = inputs.log_ratio_detached
    ratio = torch.exp(lr)
    bag.set("num_tokens", totals.num_tokens)
    bag.total("nonfinite_count", inputs.nonfinite.double())
    bag.mean("ratio_mean", ratio, v)
    bag.min("ratio_min", ratio, v)
    bag.max("ratio_max", ratio, v)
    # KL(mu || pi) estimators with samples from mu. k1 sums terms of both signs that nearly cancel, so
    # it accumulates in float64; k3's terms are all >= 0 and need no extra precision.
    bag.mean("kl_k1", lr.double(), v, scale=-1.0)
    bag.mean("kl_k3", torch.expm1(lr) - lr, v)


def add_prefix_metrics(
    bag: MetricBag, prefix: str, log_stat: torch.Tensor, inputs: PolicyInputs, totals: BatchTotals
) -> None:
    """mean / min / p10 (nearest rank) of a prefix statistic (given in log space) over valid tokens."""
    v = inputs.valid
    bag.mean(f"{prefix}_mean", torch.exp(log_stat), v)
    bag.min(f"{prefix}_min", log_stat, v, transform=math.exp)
    k = math.ceil(0.1 * totals.num_tokens)
    p10 = global_kth_smallest(log_stat, k, inputs.layout.dp_cp_group, v)  # exp is monotone: rank in log space
    bag.set(f"{prefix}_p10", math.exp(p10) if not math.isnan(p10) else p10)

"""MinPRO (Minimum Prefix Ratio, arXiv 2601.22718) and its prefix-statistic ablations.

    log rho_t = logp_t - old_logp_t
    exclusive (default): w_t = sg[clip(P_t * rho_t, 1 - eps_low, 1 + eps_high)],  P_t = stat_{i<t} rho_i
    inclusive:           w_t = sg[clip(P_t,         1 - eps_low, 1 + eps_high)],  P_t = stat_{i<=t} rho_i
    loss = -sum_t weight_t * w_t * A_t * logp_t                 (weight_t: the aggregation weight)

stat over the sequence's earlier trained response tokens (prompt, padding and untrained tokens are
neutral), computed in log space by one CP-aware segmented scan:
    min     -> min rho_i                 (MinPRO; scan op min of log-ratios)
    mean    -> mean of rho_i              (scan op logaddexp, minus log count)
    geomean -> exp(mean log rho_i)        (scan op sum, divided by count)
    prod    -> prod rho_i = rho_{1:t-1}   (the exact prefix ratio; scan op sum)
    none    -> 1                          (CISPO)
In exclusive mode the empty prefix (the first trained token) takes ``prefix_first_value`` (default 1);
``prefix_cap_at_one`` caps P_t at 1. For prod, exclusive and inclusive coincide (P_t * rho_t = prod_{i<=t}).
Like CISPO the weight is under stop-gradient, so the prefix needs no backward communication.
"""

from __future__ import annotations

import math

import torch

from minpro_megatron.losses.base import RHO_MIN, LossContext, per_token_share
from minpro_megatron.losses.common import PolicyInputs, add_prefix_metrics, exclusive_log_prefix_min, log_clip_bounds
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.losses.token_losses import add_weight_clip_metrics
from minpro_megatron.parallel.cp_scan import ScanRequest, ScanResult

__all__ = ["MinPROLoss", "log_prefix_statistic"]

_SCAN_OP = {"min": "min", "mean": "logaddexp", "geomean": "sum", "prod": "sum"}


def _scan_name(stat: str) -> str:
    return RHO_MIN if stat == "min" else f"prefix_{stat}"


def log_prefix_statistic(scan: ScanResult | None, inputs: PolicyInputs, cfg: LossConfig) -> torch.Tensor:
    """log P_t for every local token, per the options above (float32 for float32 inputs)."""
    lr = inputs.log_ratio_detached
    if cfg.prefix_stat == "none":
        return torch.zeros_like(lr)
    assert scan is not None
    op = _SCAN_OP[cfg.prefix_stat]
    if cfg.prefix_stat == "min" and not cfg.prefix_inclusive:
        log_stat = exclusive_log_prefix_min(scan, cfg.prefix_first_value).to(lr.dtype)
    else:
        if cfg.prefix_inclusive:
            value = scan.inclusive(lr, inputs.valid, op)
            count = scan.exclusive_count + inputs.valid.to(torch.int64) if scan.exclusive_count is not None else None
        else:
            value, count = scan.exclusive, scan.exclusive_count
        if cfg.prefix_stat == "min":  # inclusive: never empty on a valid token
            log_stat = value.to(lr.dtype)
        else:
            assert count is not None, "prefix means need counts"
            safe = count.clamp_min(1).to(value.dtype)
            if cfg.prefix_stat == "mean":
                value = value - torch.log(safe)
            elif cfg.prefix_stat == "geomean":
                value = value / safe
            log_stat = torch.where(count > 0, value, math.log(cfg.prefix_first_value)).to(lr.dtype)
    if cfg.prefix_cap_at_one:
        log_stat = log_stat.clamp_max(0.0)
    return log_stat


def _is_plain_rho_min(cfg: LossConfig) -> bool:
    """The statistic equals the rho_min diagnostic (so its metrics are computed once)."""
    return cfg.prefix_stat == "min" and not cfg.prefix_inclusive and cfg.prefix_first_value == 1.0 and not cfg.prefix_cap_at_one


class MinPROLoss:
    name = "minpro"
    sequence_level = False

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        if cfg.prefix_stat == "none":
            return {}
        return {_scan_name(cfg.prefix_stat): ScanRequest(inputs.log_ratio_detached, _SCAN_OP[cfg.prefix_stat])}

    def needs_counts(self, cfg: LossConfig) -> bool:
        return cfg.prefix_stat in ("mean", "geomean", "prod")

    def loss(self, ctx: LossContext) -> torch.Tensor:
        x, cfg, bag = ctx.inputs, ctx.cfg, ctx.bag
        eps_low, eps_high = cfg.clip_range()
        scan = ctx.scans.get(_scan_name(cfg.prefix_stat))
        log_stat = log_prefix_statistic(scan, x, cfg)
        lr = x.log_ratio_detached
        log_w = log_stat if cfg.prefix_inclusive else log_stat + lr
        weight = torch.exp(log_w).clamp_(1.0 - eps_low, 1.0 + eps_high)  # exp may overflow: the clip bounds it
        add_weight_clip_metrics(ctx, log_w)
        # The prefix lowered the weight below CISPO's clip(rho_t): log_w < lr, inside the clip range.
        log_lo, log_hi = log_clip_bounds(cfg)
        lowered = x.valid & (log_w < lr) & (log_w < log_hi) & (lr > log_lo)
        bag.frac("prefix_lowered_frac", lowered, "num_tokens")
        add_prefix_metrics(bag, "prefix", log_stat, x, ctx.call_totals)
        if _is_plain_rho_min(cfg) and cfg.prefix_diagnostics:
            for stat in ("mean", "min", "p10"):
                bag.alias(f"rho_min_{stat}", f"prefix_{stat}")
            ctx.rho_min_metrics_done = True
        return per_token_share(ctx, -weight * x.advantages * x.logp)

"""Float64 brute-force references for the policy losses, written plainly: loops over sequences and tokens.

A batch is a list of sequences; each sequence is a dict of 1-D float64 tensors ``logp`` (requires grad),
``old_logp``, ``adv`` and a bool ``mask``, and with a mismatch correction ``rollout_logp``.
Stop-gradient is ``.detach()``. Nothing here is shared with the implementation under test.
"""

from __future__ import annotations

import math

import torch

from minpro_megatron.config.loss import LossConfig


def mismatch_ratio(seq: dict, t: int) -> float:
    """pi_old / pi_rollout of token t."""
    return math.exp(float(seq["old_logp"][t]) - float(seq["rollout_logp"][t]))


def valid_tokens(seq: dict, cfg: LossConfig | None = None) -> tuple[list[int], int]:
    """(trained tokens, tokens the mismatch mask dropped)."""
    out, masked = [], 0
    corr = cfg.mismatch_correction if cfg is not None else "none"
    for t in range(len(seq["mask"])):
        lr = float(seq["logp"][t]) - float(seq["old_logp"][t])
        if not (bool(seq["mask"][t]) and math.isfinite(lr) and math.isfinite(float(seq["adv"][t]))):
            continue
        if corr != "none":
            if not math.isfinite(float(seq["old_logp"][t]) - float(seq["rollout_logp"][t])):
                continue
            if corr == "mask" and not (cfg.mismatch_mask_low <= mismatch_ratio(seq, t) <= cfg.mismatch_mask_high):
                masked += 1
                continue
        out.append(t)
    return out, masked


def token_weight(cfg: LossConfig, n_tokens: int, n_seqs: int, seq_len: int) -> float:
    if cfg.aggregation == "token-mean":
        return 1.0 / max(n_tokens, 1)
    if cfg.aggregation == "seq-mean-token-sum":
        return 1.0 / max(n_seqs, 1)
    return 1.0 / (seq_len * max(n_seqs, 1))


def prefix_stat(prev_ratios: list[float], stat: str, first_value: float) -> float:
    if stat == "none":
        return 1.0
    if not prev_ratios:
        return first_value
    if stat == "min":
        return min(prev_ratios)
    if stat == "mean":
        return sum(prev_ratios) / len(prev_ratios)
    if stat == "geomean":
        return math.exp(sum(math.log(r) for r in prev_ratios) / len(prev_ratios))
    if stat == "prod":
        p = 1.0
        for r in prev_ratios:
            p *= r
        return p
    raise ValueError(stat)


def log_prefix_stat(prev_log_ratios: list[float], stat: str, first_value: float) -> float:
    """Same as prefix_stat, in log space (for extreme ratios)."""
    if stat == "none":
        return 0.0
    if not prev_log_ratios:
        return math.log(first_value)
    if stat == "min":
        return min(prev_log_ratios)
    if stat == "mean":
        m = max(prev_log_ratios)
        return m + math.log(sum(math.exp(x - m) for x in prev_log_ratios) / len(prev_log_ratios))
    if stat == "geomean":
        return sum(prev_log_ratios) / len(prev_log_ratios)
    if stat == "prod":
        return sum(prev_log_ratios)
    raise ValueError(stat)


def clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def m2po_threshold(m2_values: list[float], tau: float) -> float:
    """Largest value v such that the mean of all M2 <= v is <= tau (0-valued tokens always allowed)."""
    best = 0.0
    for v in sorted(set(m2_values)):
        kept = [m for m in m2_values if m <= v]
        if sum(kept) / len(kept) <= tau:
            best = v
    return best


def reference_loss(seqs: list[dict], cfg: LossConfig, ref_logp: list[torch.Tensor] | None = None):
    """Returns (loss tensor with autograd to every seq['logp'], metrics dict)."""
    eps_low, eps_high = cfg.clip_range()
    vm = [valid_tokens(s, cfg) for s in seqs]
    valid = [v for v, _ in vm]
    n_masked = sum(m for _, m in vm)
    tis = cfg.mismatch_correction == "tis"
    is_factors: list[float] = []  # per trained token
    n_truncated = 0
    n_tokens = sum(len(v) for v in valid)
    n_seqs = sum(1 for v in valid if v)
    loss = torch.zeros((), dtype=torch.float64)
    clip_high = clip_low = lowered = dual = 0
    ratios, rho_mins, prefix_vals, kl_ref = [], [], [], []

    m2_all = []
    for s, v in zip(seqs, valid):
        for t in v:
            m2_all.append((float(s["logp"][t]) - float(s["old_logp"][t])) ** 2)
    threshold = m2po_threshold(m2_all, cfg.m2po_tau) if cfg.name == "m2po" else None
    masked = 0

    for i, (s, v) in enumerate(zip(seqs, valid)):
        if not v:
            continue
        w = token_weight(cfg, n_tokens, n_seqs, len(v))
        prev_lr: list[float] = []
        if cfg.name == "gspo":
            lr_sum = sum(s["logp"][t] - s["old_logp"][t] for t in v)
            seq_ratio = torch.exp(lr_sum / len(v))
            a = sum(float(s["adv"][t]) for t in v) / len(v)
            l_unclipped = -a * seq_ratio
            l_clipped = -a * torch.clamp(seq_ratio, 1 - eps_low, 1 + eps_high)
            c = 1.0
            if tis:  # sequence level: the geometric mean of the mismatch ratios, truncated
                geo = math.exp(sum(math.log(mismatch_ratio(s, t)) for t in v) / len(v))
                c = min(geo, cfg.mismatch_tis_cap)
                is_factors += [c] * len(v)
                n_truncated += len(v) if geo > cfg.mismatch_tis_cap else 0
            loss = loss + w * len(v) * c * torch.maximum(l_unclipped, l_clipped)
            if float(l_clipped) > float(l_unclipped):
                if float(seq_ratio) > 1:
                    clip_high += len(v)
                else:
                    clip_low += len(v)
        for t in v:
            logp, old, a = s["logp"][t], float(s["old_logp"][t]), float(s["adv"][t])
            lr = float(logp) - old
            ratio = math.exp(lr)
            ratios.append(ratio)
            c = 1.0  # token-level TIS factor
            if tis and cfg.name != "gspo":
                c = min(mismatch_ratio(s, t), cfg.mismatch_tis_cap)
                is_factors.append(c)
                n_truncated += mismatch_ratio(s, t) > cfg.mismatch_tis_cap
            rho_mins.append(math.exp(log_prefix_stat(prev_lr, "min", 1.0)))
            if cfg.name == "grpo":
                r = torch.exp(logp - old)
                unclipped, clipped = -a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high)
                lt = torch.maximum(unclipped, clipped)
                if float(clipped) > float(unclipped):
                    if ratio > 1:
                        clip_high += 1
                    else:
                        clip_low += 1
                if cfg.dual_clip is not None and a < 0:
                    if -a * cfg.dual_clip < float(lt):
                        dual += 1
                    lt = torch.minimum(lt, torch.tensor(-a * cfg.dual_clip, dtype=torch.float64))
                if cfg.kl_coef > 0:
                    delta = ref_logp[i][t] - logp
                    kl = torch.exp(delta) - delta - 1
                    kl_ref.append(float(kl))
                    lt = lt + cfg.kl_coef * kl
                loss = loss + w * c * lt
            elif cfg.name == "cispo":
                weight = clip(ratio, 1 - eps_low, 1 + eps_high)
                clip_high += ratio > 1 + eps_high
                clip_low += ratio < 1 - eps_low
                loss = loss + w * c * (-weight * a * logp)
            elif cfg.name == "minpro":
                if cfg.prefix_inclusive:
                    log_p = log_prefix_stat(prev_lr + [lr], cfg.prefix_stat, cfg.prefix_first_value)
                else:
                    log_p = log_prefix_stat(prev_lr, cfg.prefix_stat, cfg.prefix_first_value)
                if cfg.prefix_cap_at_one:
                    log_p = min(log_p, 0.0)
                prefix_vals.append(math.exp(log_p))
                log_raw = log_p if cfg.prefix_inclusive else log_p + lr
                raw = math.exp(log_raw) if log_raw < 700 else math.inf
                weight = clip(raw, 1 - eps_low, 1 + eps_high)
                clip_high += raw > 1 + eps_high
                clip_low += raw < 1 - eps_low
                lowered += weight < clip(ratio, 1 - eps_low, 1 + eps_high)
                loss = loss + w * c * (-weight * a * logp)
            elif cfg.name == "m2po":
                keep = lr * lr <= threshold
                if not keep:
                    masked += 1
                    clip_high += lr > 0
                    clip_low += lr < 0
                else:
                    loss = loss + w * c * (-torch.exp(logp - old) * a)
            prev_lr.append(lr)

    metrics = {
        "num_tokens": float(n_tokens),
        "clip_frac_high": clip_high / n_tokens if n_tokens else 0.0,
        "clip_frac_low": clip_low / n_tokens if n_tokens else 0.0,
        "ratio_mean": sum(ratios) / len(ratios) if ratios else math.nan,
        "ratio_min": min(ratios) if ratios else math.nan,
        "ratio_max": max(ratios) if ratios else math.nan,
        "kl_k1": sum(-math.log(r) for r in ratios) / len(ratios) if ratios else math.nan,
        "kl_k3": sum(r - 1 - math.log(r) for r in ratios) / len(ratios) if ratios else math.nan,
        "rho_min_mean": sum(rho_mins) / len(rho_mins) if rho_mins else math.nan,
        "rho_min_min": min(rho_mins) if rho_mins else math.nan,
        "rho_min_p10": nearest_rank(rho_mins, 0.1),
    }
    if cfg.name == "minpro":
        metrics["prefix_lowered_frac"] = lowered / n_tokens if n_tokens else 0.0
        metrics["prefix_mean"] = sum(prefix_vals) / len(prefix_vals) if prefix_vals else math.nan
        metrics["prefix_min"] = min(prefix_vals) if prefix_vals else math.nan
        metrics["prefix_p10"] = nearest_rank(prefix_vals, 0.1)
    if cfg.name == "grpo" and cfg.dual_clip is not None:
        metrics["dual_clip_frac"] = dual / n_tokens if n_tokens else 0.0
    if cfg.name == "grpo" and cfg.kl_coef > 0:
        metrics["kl_ref_k3"] = sum(kl_ref) / len(kl_ref)
    if tis:
        metrics["mismatch_is_mean"] = sum(is_factors) / len(is_factors) if is_factors else math.nan
        metrics["mismatch_truncated_frac"] = n_truncated / n_tokens if n_tokens else 0.0
    if cfg.mismatch_correction == "mask":
        metrics["mismatch_masked_count"] = float(n_masked)
        metrics["mismatch_masked_frac"] = n_masked / (n_masked + n_tokens) if n_masked + n_tokens else 0.0
    if cfg.name == "m2po":
        metrics["m2po_masked_frac"] = masked / n_tokens if n_tokens else 0.0
        kept = [m for m in m2_all if m <= threshold]
        metrics["m2po_threshold"] = max(kept) if kept else math.nan
    return loss, metrics


def nearest_rank(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    k = math.ceil(q * len(values))
    return sorted(values)[max(k, 1) - 1]

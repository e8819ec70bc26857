"""Train-inference mismatch: the correction every registry loss can apply, and the mismatch metrics.

With ``loss.old_logp=recompute`` the learner recomputes the old log-probs (pi_old) of a step's samples
with one forward before the step's first update, and the server's log-probs (pi_rollout) travel next to
them as ``rollout_logp``. The loss ratio is then pi / pi_old, and the mismatch ratio
m_t = pi_old(t) / pi_rollout(t) measures how far the server's sampling distribution lies from the
learner's. At staleness 0 pi_old is the behaviour version itself, so m_t is pure train-inference
mismatch (kernels, precision, routing); at staleness n > 0 pi_old is the current policy before the
update - the proximal policy of decoupled PPO - and m_t also holds the n versions of policy drift.

``loss.mismatch_correction`` (applied inside losses/base.py run_policy_loss, so it composes with every
loss):

- ``tis``: truncated importance sampling. Each token's loss term is multiplied by
  c_t = sg[min(m_t, C)], C = ``loss.mismatch_tis_cap``. GSPO is sequence-level, so it multiplies each
  sequence's term by c_i = sg[min(exp(mean_t log m_t), C)], the truncated geometric mean of the token
  ratios over the sequence's trained tokens; the mean comes from the same CP exchange as GSPO's own
  sequence sums, so it is exact under context parallelism.
- ``mask``: tokens with m_t outside [``mismatch_mask_low``, ``mismatch_mask_high``] are dropped as if
  their loss mask were False: they leave the loss, its normalisers, the prefix scans (MinPRO), GSPO's
  sequence means and the metrics. Token-level for every loss, GSPO included.

How this maps to verl's ``algorithm.rollout_correction``: ``old_logp=recompute`` is ``bypass_mode=False``
(decoupled: old_log_prob recomputed by the actor) and ``old_logp=rollout`` is ``bypass_mode=True``;
``tis`` is ``rollout_is=token`` (``rollout_is=sequence`` for GSPO, which there is a product rather than
a geometric mean) with ``rollout_is_threshold`` = C as the upper clamp; ``mask`` is token-level
rejection sampling (``rollout_rs`` with the ratio band ``rollout_rs_threshold_lower`` /
``rollout_rs_threshold``) whose rejected tokens leave the response mask. Not provided: verl's batch
normalisation of IS weights and its sequence-level rejection modes.

Loss metrics: ``mismatch_is_mean`` (mean factor over trained tokens) and ``mismatch_truncated_frac``
(tis), ``mismatch_masked_frac`` / ``mismatch_masked_count`` (mask; the fraction of the tokens the mask
saw). ``mismatch_metrics`` below gives the step's ``mismatch/*`` statistics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from minpro_megatron.parallel.reduce import MetricBag, global_kth_smallest

__all__ = ["mask_band_keep", "tis_factor", "mismatch_metrics"]


def mask_band_keep(log_m: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """True where low <= m_t <= high (compared in log space; low = 0 has no lower bound)."""
    log_low = math.log(low) if low > 0 else -math.inf
    return (log_m >= log_low) & (log_m <= math.log(high))


def tis_factor(log_m: torch.Tensor, cap: float) -> torch.Tensor:
    """sg[min(m, C)], computed as exp(min(log m, log C)) so a huge m cannot overflow."""
    return torch.exp(log_m.detach().clamp_max(math.log(cap)))


def mismatch_metrics(
    learner_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    group: dist.ProcessGroup | None,
    prefix: str = "mismatch/",
) -> dict[str, float]:
    """Statistics of delta_t = learner_logp - rollout_logp over the ``mask``ed tokens, pooled over the
    ranks of ``group`` (which must hold disjoint tokens, e.g. DP x CP): mean and max |delta|, the k3
    estimate of KL(pi_rollout || pi_learner) (mean of exp(delta) - 1 - delta, samples from the server),
    the exact p10 / p90 (nearest rank) of the ratio exp(delta) and the token count. Tokens where either
    log-prob is not finite are left out and counted in ``nonfinite_count``."""
    delta = (learner_logp.detach().double() - rollout_logp.detach().double()).reshape(-1)
    mask = mask.reshape(-1).to(torch.bool)
    valid = mask & torch.isfinite(delta)
    delta = torch.where(valid, delta, 0.0)
    bag = MetricBag()
    bag.total("num_tokens", valid.sum().double())
    bag.total("nonfinite_count", (mask & ~valid).sum().double())
    bag.mean("abs_delta_mean", delta.abs(), valid)
    bag.max("abs_delta_max", delta.abs(), valid)
    bag.mean("kl_k3", torch.expm1(delta) - delta, valid)
    out = bag.reduce(group)
    n = int(out["num_tokens"])
    for q in (10, 90):  # exp is monotone: rank the log-ratios
        kth = global_kth_smallest(delta.float(), math.ceil(q / 100 * n), group, valid) if n else math.nan
        out[f"ratio_p{q}"] = math.exp(kth) if not math.isnan(kth) else math.nan
    return {prefix + k: v for k, v in out.items()}

"""Policy-loss configuration shared by every loss in the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LossName = Literal["grpo", "gspo", "cispo", "m2po", "minpro"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
PrefixStat = Literal["min", "mean", "geomean", "prod", "none"]
OldLogp = Literal["rollout", "recompute"]
MismatchCorrection = Literal["none", "tis", "mask"]

# Clip ranges when eps_low / eps_high are left unset. GRPO: DAPO clip-higher. CISPO / MinPRO: no lower
# bound in effect (weights may go to 0, which is how MinPRO suppresses off-track continuations) and the
# common eps_high of 0.28. GSPO: the paper's sequence-level range.
DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.28),
    "cispo": (1.0, 0.28),
    "minpro": (1.0, 0.28),
    "gspo": (3e-4, 4e-4),
    "m2po": (0.0, 0.0),  # unused: M2PO does not clip
}


@dataclass
class LossConfig:
    """Options of the policy-loss family (see docs in each loss module).

    name: which loss. aggregation: token-mean over the global batch (default), seq-mean-token-mean or
    seq-mean-token-sum (means over sequences of the global batch).
    eps_low / eps_high: clip range [1 - eps_low, 1 + eps_high]; None takes the loss's default (DEFAULT_CLIP).
    dual_clip: GRPO dual-clip constant c > 1 (None = off). log_ratio_clamp: GRPO clamps log r to [-c, c]
    before exp (None = off; verl clamps at 20 so exp never overflows). kl_coef: weight of the k3 KL to a reference
    policy (needs ref_logp). m2po_tau: M2PO second-moment threshold.
    prefix_stat / prefix_inclusive / prefix_first_value / prefix_cap_at_one: MinPRO's prefix statistic,
    whether it includes the current token (then it is the weight itself), its value on the first
    response token (exclusive mode) and whether it is capped at 1.
    prefix_diagnostics: also compute prefix-min statistics for losses that do not use them (one extra
    O(sequences) CP exchange), so sweeps can compare rho_min across methods.
    old_logp / mismatch_*: the behaviour log-probs of the ratio and the train-inference mismatch
    correction (losses/mismatch.py).
    """

    name: LossName = "minpro"  # policy loss (README 'Losses')
    aggregation: Aggregation = "token-mean"  # token-mean over the global batch, or means over sequences
    eps_low: float | None = None  # clip range low side: r >= 1 - eps_low; None: the loss's default (DEFAULT_CLIP)
    eps_high: float | None = None  # clip range high side: r <= 1 + eps_high; None: the loss's default
    dual_clip: float | None = None  # GRPO dual-clip constant c > 1; None: off; other losses ignore it
    log_ratio_clamp: float | None = None  # GRPO: clamp log r to +-this before exp (verl uses 20); None: off; other losses ignore it
    kl_coef: float = 0.0  # GRPO: weight of the k3 KL to a reference policy
    m2po_tau: float = 0.04  # M2PO second-moment threshold
    prefix_stat: PrefixStat = "min"  # MinPRO prefix statistic (prod: exact prefix ratio; none: CISPO)
    prefix_inclusive: bool = False  # the statistic includes the current token (then it is the weight itself)
    prefix_first_value: float = 1.0  # P at the first response token (exclusive mode); 1 is neutral
    prefix_cap_at_one: bool = False  # cap the prefix statistic at 1
    prefix_diagnostics: bool = True  # prefix-min metrics (rho_min_*) for every loss, for sweeps
    old_logp: OldLogp = "rollout"  # ratio denominator: the server's log-probs, or recompute (one learner forward before the step's first update; logs mismatch/*)
    mismatch_correction: MismatchCorrection = "none"  # correct pi_old/pi_rollout (needs old_logp=recompute): tis = truncated IS factor, mask = drop tokens outside the band
    mismatch_tis_cap: float = 2.0  # tis: cap C of the factor sg[min(pi_old/pi_rollout, C)] (verl's rollout_is_threshold)
    mismatch_mask_low: float = 0.5  # mask: drop tokens with pi_old/pi_rollout below this
    mismatch_mask_high: float = 2.0  # mask: drop tokens with pi_old/pi_rollout above this

    def clip_range(self) -> tuple[float, float]:
        lo, hi = DEFAULT_CLIP[self.name]
        return (lo if self.eps_low is None else self.eps_low, hi if self.eps_high is None else self.eps_high)

    def validate(self) -> None:
        from minpro_megatron.config.base import ConfigError

        lo, hi = self.clip_range()
        if lo < 0 or hi < 0:
            raise ConfigError(f"loss.eps_low / loss.eps_high must be >= 0, got {lo} / {hi}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"loss.dual_clip must be > 1 (e.g. 3.0) or null, got {self.dual_clip}")
        if self.log_ratio_clamp is not None and self.log_ratio_clamp <= 0:
            raise ConfigError(f"loss.log_ratio_clamp must be > 0 (verl uses 20.0) or null, got {self.log_ratio_clamp}")
        if self.kl_coef < 0:
            raise ConfigError(f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        if self.m2po_tau <= 0:
            raise ConfigError(f"loss.m2po_tau must be > 0 (the M2PO paper uses 0.04), got {self.m2po_tau}")
        if self.prefix_first_value <= 0:
            raise ConfigError(f"loss.prefix_first_value must be > 0 (1 is neutral), got {self.prefix_first_value}")
        if self.mismatch_correction != "none" and self.old_logp != "recompute":
            raise ConfigError(
                f"loss.mismatch_correction={self.mismatch_correction!r} compares the recomputed old log-probs with "
                "the server's; with loss.old_logp='rollout' they are the same. Set loss.old_logp=recompute"
            )
        if self.mismatch_tis_cap <= 0:
            raise ConfigError(f"loss.mismatch_tis_cap must be > 0 (verl's default is 2.0), got {self.mismatch_tis_cap}")
        if not 0 <= self.mismatch_mask_low < self.mismatch_mask_high:
            raise ConfigError(
                "loss.mismatch_mask_low / loss.mismatch_mask_high must satisfy 0 <= low < high (e.g. 0.5 / 2.0), "
                f"got {self.mismatch_mask_low} / {self.mismatch_mask_high}"
            )
        if self.kl_coef > 0 and self.name != "grpo":
            raise ConfigError(f"loss.kl_coef is only used by grpo; set it to 0 for loss.name={self.name!r}")

"""The driver every registry loss runs through: checks -> one CP scan exchange -> per-token loss ->
aggregation -> global metrics. A loss only says which prefix scans it needs and how a token's loss
follows from them (``PolicyLossImpl``)."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from minpro_megatron.losses.common import (
    BatchTotals,
    PolicyInputs,
    add_common_metrics,
    add_prefix_metrics,
    aggregate,
    batch_totals,
    exclusive_log_prefix_min,
    prepare_inputs,
    run_scans,
    token_weights,
)
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.losses.mismatch import tis_factor
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.cp_scan import ScanRequest, ScanResult
from minpro_megatron.parallel.reduce import MetricBag

__all__ = ["LossContext", "PolicyLossImpl", "run_policy_loss"]

RHO_MIN = "rho_min"  # the exclusive prefix-min scan of log-ratios, shared by MinPRO and diagnostics


class LossContext:
    """What a loss implementation sees: validated inputs, scan results by name, weights, metrics."""

    def __init__(
        self,
        inputs: PolicyInputs,
        cfg: LossConfig,
        scans: dict[str, ScanResult],
        weights: torch.Tensor | float,
        seq_count: torch.Tensor | None,
        call_totals: BatchTotals,
        norm_totals: BatchTotals,
        bag: MetricBag,
        ref_logp: torch.Tensor | None,
    ) -> None:
        self.inputs = inputs
        self.cfg = cfg
        self.scans = scans
        self.weights = weights
        self.seq_count = seq_count
        self.call_totals = call_totals  # this call's global counts (metrics)
        self.norm_totals = norm_totals  # the counts the loss is normalised by (the step's, with micro-batches)
        self.bag = bag
        self.ref_logp = ref_logp
        self._log_rho_min: torch.Tensor | None = None
        self.rho_min_metrics_done = False  # a loss that reports the same statistic may fill them
        # Token-level TIS factor sg[min(pi_old/pi_rollout, C)] that per_token_share applies (losses/mismatch.py);
        # None without it and for sequence-level losses, which apply their own.
        self.is_factor: torch.Tensor | None = None

    def log_rho_min(self) -> torch.Tensor:
        if self._log_rho_min is None:
            self._log_rho_min = exclusive_log_prefix_min(self.scans[RHO_MIN])
        return self._log_rho_min


class PolicyLossImpl(Protocol):
    name: str
    # A sequence-level loss (GSPO) applies the TIS mismatch correction per sequence itself.
    sequence_level: bool

    def scan_requests(self, inputs: PolicyInputs, cfg: LossConfig) -> dict[str, ScanRequest]:
        """Named prefix scans this loss needs (run together in one CP exchange)."""
        ...

    def needs_counts(self, cfg: LossConfig) -> bool:
        """Whether the scans must also count valid tokens (prefix means, sequence lengths)."""
        ...

    def loss(self, ctx: LossContext) -> torch.Tensor:
        """This rank's share of the aggregated loss; may add metrics to ctx.bag."""
        ...


def run_policy_loss(
    impl: PolicyLossImpl,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    layout: ZigzagLayout,
    cfg: LossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    totals: BatchTotals | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns (this rank's loss share, global metrics). ``totals``: the step's global token and sequence
    counts when a batch is split into several calls (micro-batches); by default this call's own.
    ``rollout_logp``: the server's log-probs, needed by ``cfg.mismatch_correction`` (losses/mismatch.py)
    and ignored without one."""
    if cfg.name != impl.name:
        raise ValueError(f"loss.name={cfg.name!r} but the {impl.name!r} loss was called")
    corr = cfg.mismatch_correction
    if corr != "none" and rollout_logp is None:
        raise ValueError(
            f"loss.mismatch_correction={corr!r} needs rollout_logp (the server's log-probs; the trainer passes "
            "them with loss.old_logp=recompute)"
        )
    inputs = prepare_inputs(
        logp, old_logp, advantages, mask, layout,
        rollout_logp=rollout_logp if corr != "none" else None,
        keep_band=(cfg.mismatch_mask_low, cfg.mismatch_mask_high) if corr == "mask" else None,
    )
    requests = dict(impl.scan_requests(inputs, cfg))
    if cfg.prefix_diagnostics and RHO_MIN not in requests:
        requests[RHO_MIN] = ScanRequest(inputs.log_ratio_detached, "min")
    names = list(requests)
    results = run_scans(inputs, [requests[n] for n in names], cfg, impl.needs_counts(cfg))
    scans = dict(zip(names, results)) if results is not None else {}
    seq_count = results[0].seq_count if results and results[0].seq_count is not None else None
    call_totals = batch_totals(inputs, seq_count)
    norm = totals if totals is not None else call_totals
    weights = token_weights(inputs, cfg, norm, seq_count)

    bag = MetricBag()
    ctx = LossContext(inputs, cfg, scans, weights, seq_count, call_totals, norm, bag, ref_logp)
    if corr == "tis" and not getattr(impl, "sequence_level", False):
        assert inputs.mismatch_log_ratio is not None
        ctx.is_factor = tis_factor(inputs.mismatch_log_ratio, cfg.mismatch_tis_cap)
        bag.mean("mismatch_is_mean", ctx.is_factor, inputs.valid)
        truncated = inputs.valid & (inputs.mismatch_log_ratio > math.log(cfg.mismatch_tis_cap))
        bag.frac("mismatch_truncated_frac", truncated, "num_tokens")
    if corr == "mask":
        assert inputs.mismatch_masked is not None
        bag.total("mismatch_masked_count", inputs.mismatch_masked.double())
        bag.derived("mismatch_masked_frac", _masked_frac)
    loss = impl.loss(ctx)
    add_common_metrics(bag, inputs, call_totals)
    if RHO_MIN in scans and not ctx.rho_min_metrics_done:
        add_prefix_metrics(bag, "rho_min", ctx.log_rho_min(), inputs, call_totals)
    bag.total("loss", loss.detach().double())
    return loss, bag.reduce(layout.dp_cp_group)


def _masked_frac(m: dict[str, float]) -> float:
    seen = m["mismatch_masked_count"] + m["num_tokens"]
    return m["mismatch_masked_count"] / seen if seen > 0 else 0.0


def per_token_share(ctx: LossContext, per_token: torch.Tensor) -> torch.Tensor:
    """Aggregate a per-token loss that is 0 on invalid tokens (times the TIS factor, if any)."""
    if ctx.is_factor is not None:
        per_token = per_token * ctx.is_factor
    return aggregate(per_token, ctx.weights)

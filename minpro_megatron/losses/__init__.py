"""Registry of policy losses: ``loss(logp, old_logp, advantages, mask, layout, cfg) -> (loss, metrics)``.

    from minpro_megatron.losses import get_loss, policy_loss
    loss, metrics = get_loss("minpro")(logp, old_logp, adv, mask, layout, cfg)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, layout, cfg)   # dispatches on cfg.name

See losses/common.py for the conventions (inputs, dropped tokens, loss shares, global metrics).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from minpro_megatron.losses.base import PolicyLossImpl, run_policy_loss
from minpro_megatron.losses.common import BatchTotals
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.losses.gspo import GSPOLoss
from minpro_megatron.losses.minpro import MinPROLoss
from minpro_megatron.losses.token_losses import CISPOLoss, GRPOLoss, M2POLoss
from minpro_megatron.parallel.cp_layout import ZigzagLayout

__all__ = ["LOSSES", "LossFn", "get_loss", "policy_loss", "LossConfig", "BatchTotals", "register_loss"]

LossFn = Callable[..., "tuple[torch.Tensor, dict[str, float]]"]

_IMPLS: dict[str, PolicyLossImpl] = {}
LOSSES: dict[str, LossFn] = {}


def register_loss(impl: PolicyLossImpl) -> LossFn:
    fn = functools.partial(run_policy_loss, impl)
    functools.update_wrapper(fn, run_policy_loss)
    _IMPLS[impl.name] = impl
    LOSSES[impl.name] = fn
    return fn


for _impl in (GRPOLoss(), GSPOLoss(), CISPOLoss(), M2POLoss(), MinPROLoss()):
    register_loss(_impl)


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss.name={name!r} is not registered; choose one of {', '.join(sorted(LOSSES))}") from None


def policy_loss(
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
    return get_loss(cfg.name)(
        logp, old_logp, advantages, mask, layout, cfg, ref_logp=ref_logp, totals=totals, rollout_logp=rollout_logp
    )

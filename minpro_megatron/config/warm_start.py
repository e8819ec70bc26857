"""Rules of the supervised warm start's fields (``train.warm_start_*``): a fixed number of steps, or steps
until a sampled-accuracy criterion is met with ``train.warm_start_steps`` as the cap
(minpro_megatron/train/warm_start.py)."""

from __future__ import annotations

import math
from typing import Any

from minpro_megatron.config.base import ConfigError

__all__ = ["check_warm_start"]


def check_warm_start(t: Any) -> None:
    """``t`` is the TrainConfig; each error names the field and the fix."""
    if t.warm_start_steps < 0:
        raise ConfigError(f"train.warm_start_steps={t.warm_start_steps} must be >= 0 (0: no warm start)")
    goal = t.warm_start_until_accuracy
    if not isinstance(goal, (int, float)) or isinstance(goal, bool) or not math.isfinite(goal) or not 0.0 <= goal <= 1.0:
        raise ConfigError(
            f"train.warm_start_until_accuracy={goal!r} must be a sampled accuracy in (0, 1], or 0 to turn the criterion "
            "off (then the warm start is exactly train.warm_start_steps steps)"
        )
    if goal == 0:
        return
    if t.warm_start_steps < 1:
        raise ConfigError(
            f"train.warm_start_until_accuracy={goal:g} needs train.warm_start_steps >= 1: it is the cap on the warm "
            "start's length (e.g. train.warm_start_steps=600); for no warm start set train.warm_start_until_accuracy=0 too"
        )
    if t.warm_start_check_interval < 1:
        raise ConfigError(
            f"train.warm_start_check_interval={t.warm_start_check_interval} must be >= 1 (warm-start steps between "
            "accuracy checks, e.g. 25)"
        )
    if t.warm_start_check_samples < 1:
        raise ConfigError(
            f"train.warm_start_check_samples={t.warm_start_check_samples} must be >= 1 (prompts sampled per accuracy "
            "check, e.g. 64)"
        )

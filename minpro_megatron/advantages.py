"""GRPO group-normalised advantages: A_i = (R_i - mean_G R) / (std_G R + eps), one value per response."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """Advantages of one group (the G responses of one prompt). std is the unbiased sample std (as in
    verl and TRL); a group of identical rewards (or of one response) has all-zero advantages."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if r.numel() < 2:
        return [0.0] * r.numel()
    std = r.std(unbiased=True)
    return ((r - r.mean()) / (std + eps)).tolist()

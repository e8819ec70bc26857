"""loss.old_logp=recompute: the learner's own old log-probs for a step's samples, and the mismatch metrics.

One forward-only pass (Learner.score) over the step's samples before its first update replaces each
sample's ``old_logp`` with the learner's log-probs and keeps the server's as ``rollout_logp``; the loss
ratio is then pi / pi_old and the mismatch correction compares pi_old with pi_rollout
(losses/mismatch.py). The learner scores with its *current* weights: at staleness 0 these are exactly
the weights that generated the samples (the behaviour version), so the difference to the server is pure
train-inference mismatch; at staleness n > 0 they are n versions newer - the proximal policy of
decoupled PPO - and the difference also holds the policy drift. With several updates per batch the
recompute happens once, before the first, so every update shares the same pi_old.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.learner.batch import TrainSample
from minpro_megatron.losses.mismatch import mismatch_metrics

__all__ = ["recompute_old_logp"]


def recompute_old_logp(learner: Any, samples: Sequence[TrainSample], dp_group: dist.ProcessGroup | None) -> dict[str, float]:
    """Collective over the job (every rank calls it with its DP shard). Returns the ``mismatch/*``
    metrics (learner vs server log-probs over the trained tokens), global over data parallelism."""
    samples = list(samples)
    for s, lp in zip(samples, learner.score(samples)):
        s.rollout_logp, s.old_logp = s.old_logp, lp.to(torch.float32)
    if samples:
        cat = lambda key: torch.cat([getattr(s, key) for s in samples])  # noqa: E731
        learner_lp, rollout_lp, mask = cat("old_logp"), cat("rollout_logp"), cat("loss_mask")
    else:  # still joins the collectives
        learner_lp = rollout_lp = torch.zeros(0)
        mask = torch.zeros(0, dtype=torch.bool)
    return mismatch_metrics(learner_lp, rollout_lp, mask, dp_group)

"""rollout.partial (in-flight weight updates, config/partial.py): the combinations that cannot be right are
refused by ``validate()`` with the fields named; the one that can is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from minpro_megatron.config import load_config
from minpro_megatron.config.base import ConfigError

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny_moe_cpu.yaml"
GOOD = ["rollout.partial=true", "rollout.backend=sglang", "rollout.pause_mode=retract",
        "rollout.staleness.mode=bounded", "rollout.staleness.n=1"]

BAD = [
    (["rollout.backend=local"], r"rollout\.partial=true needs rollout\.backend=sglang"),
    (["rollout.pause_mode=abort"], r"rollout\.partial=true needs rollout\.pause_mode=retract"),
    (["rollout.staleness.mode=exact"], r"rollout\.staleness\.mode=bounded with rollout\.staleness\.n >= 1 \(got mode=exact"),
    (["rollout.staleness.n=0"], r"rollout\.staleness\.n >= 1 \(got mode=bounded, n=0\)"),
    (["loss.old_logp=recompute"], r"rollout\.partial=true with loss\.old_logp='recompute' is wrong.*set loss\.old_logp=rollout"),
    (["rollout.routing_replay=rollout"], r"rollout\.partial=true with rollout\.routing_replay='rollout'"),
]


@pytest.mark.parametrize("overrides, match", BAD)
def test_partial_refuses_what_cannot_be_right(overrides, match) -> None:
    cfg = load_config(TINY, GOOD + overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_partial_with_sglang_retract_and_bounded_age_is_accepted() -> None:
    load_config(TINY, GOOD).validate(world_size=1)
    load_config(TINY, GOOD + ["rollout.staleness.n=3", "loss.name=grpo"]).validate()

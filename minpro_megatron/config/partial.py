"""The combinations ``rollout.partial`` (in-flight weight updates) can be right with.

With partial rollouts a weight sync pauses the servers in SGLang's ``retract`` mode: running requests go
back to the waiting queue keeping their tokens, and after the update their KV is recomputed with the new
weights, so every later token is sampled from the new version (README 'Partial rollouts'). One response then holds tokens of several versions, each with the server's log-prob
at the version that sampled it. What cannot work with that is refused here, naming the fields.
"""

from __future__ import annotations

from typing import Any

from minpro_megatron.config.base import ConfigError

__all__ = ["check_partial"]


def check_partial(rollout: Any, loss: Any) -> None:
    """``rollout`` a RolloutConfig, ``loss`` a LossConfig; raises ConfigError for an impossible combination."""
    if rollout.backend != "sglang":
        raise ConfigError(
            "rollout.partial=true needs rollout.backend=sglang: the local engine samples with the learner's own "
            "model in the learner's process, so no weight update can happen while it generates"
        )
    if rollout.pause_mode != "retract":
        raise ConfigError(
            f"rollout.partial=true needs rollout.pause_mode=retract (got {rollout.pause_mode!r}): 'abort' ends the "
            "in-flight requests at every sync, so no response would continue across it"
        )
    st = rollout.staleness
    if st.mode != "bounded" or st.n < 1:
        raise ConfigError(
            f"rollout.partial=true needs rollout.staleness.mode=bounded with rollout.staleness.n >= 1 (got mode="
            f"{st.mode}, n={st.n}): a response that continues across a sync is at least one version old when "
            "it is trained, and exact delay requires every token of a batch from one version"
        )
    if loss.old_logp != "rollout":
        raise ConfigError(
            f"rollout.partial=true with loss.old_logp={loss.old_logp!r} is wrong: a recompute scores every token "
            "with one version, but a partial response holds tokens of several; set loss.old_logp=rollout (each "
            "token's own behaviour log-prob) or rollout.partial=false"
        )
    if rollout.routing_replay != "off":
        raise ConfigError(
            f"rollout.partial=true with rollout.routing_replay={rollout.routing_replay!r}: SGLang 0.5.23 drops a "
            "retracted request's routed experts and captures them again at the new version, so the replayed "
            "routing of the earlier tokens would not be the routing that generated them; set "
            "rollout.routing_replay=off or rollout.partial=false"
        )

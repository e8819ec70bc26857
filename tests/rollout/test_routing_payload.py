"""The routing-replay payload (RolloutSample.routed_experts) survives the RL-state checkpoint: a scored Group
with it goes through Group.to_state -> torch.save -> torch.load(weights_only=True) -> Group.from_state
(the staleness buffers' path in train/batch_source.py) unchanged in values, shape and dtype, and reaches
the learner's TrainSample; groups saved before the field existed load with None."""

from __future__ import annotations

import io

import torch

from minpro_megatron.data.tasks import Problem
from minpro_megatron.rollout.buffer import BoundedAgeBuffer
from minpro_megatron.rollout.types import RolloutSample, SampleGroup, WeightVersionSpan
from minpro_megatron.train.groups import Group, train_samples


def _group(routed: bool) -> Group:
    g = SampleGroup()
    for k in range(2):
        prompt, resp = [3, 4, 5], [6, 7, 8, 9][: 2 + k]
        n = len(prompt) + len(resp) - 1
        routing = torch.randint(0, 128, (n, 48, 8), dtype=torch.uint8) if routed else None
        g.append(RolloutSample(0, k, prompt, resp, [-0.5] * len(resp), [2] * len(resp), "stop", "local",
                               version_spans=[WeightVersionSpan(2, 0, len(resp))], routed_experts=routing))
    return Group(Problem("p", "a", "arithmetic"), g, [1.0, 0.0], [0.5, -0.5])


def test_payload_survives_the_rl_state_checkpoint() -> None:
    group = _group(routed=True)
    buf = BoundedAgeBuffer(n=1)
    buf.put([group])
    state = {**buf.state_dict(), "queue": [g.to_state() for g in buf.state_dict()["queue"]]}
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=True)  # no pickle of arbitrary objects
    back = Group.from_state(loaded["queue"][0])
    for a, b in zip(group.samples, back.samples):
        assert b.routed_experts.dtype == torch.uint8
        assert torch.equal(a.routed_experts, b.routed_experts)
    for s, t in zip(back.samples, train_samples([back])):
        assert torch.equal(t.routed_experts, s.routed_experts)
        assert t.routed_experts.shape[0] == t.tokens.numel() - 1


def test_groups_saved_without_the_field_load_with_none() -> None:
    state = _group(routed=False).to_state()
    for s in state["samples"]:
        del s["routed_experts"]
    back = Group.from_state(state)
    assert all(s.routed_experts is None for s in back.samples)
    assert all(t.routed_experts is None for t in train_samples([back]))

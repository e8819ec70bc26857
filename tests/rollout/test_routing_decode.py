"""SGLang's meta_info.routed_experts (base64 int32 [tokens - 1, layers, top-k]) -> the compact payload
(rollout/routing.py), and the payload through the rank-to-rank sample transfer (rollout/transfer.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from minpro_megatron.rollout.routing import RoutingSpec, decode_routed_experts
from minpro_megatron.rollout.transfer import decode_groups, encode_groups
from minpro_megatron.rollout.types import RolloutSample, SampleGroup, ServerResponseError

SPEC = RoutingSpec(num_layers=3, moe_layers=(0, 1, 2), topk=2, num_experts=4)


def _meta(ids: np.ndarray) -> dict:
    return {"routed_experts": base64.b64encode(ids.astype(np.int32).tobytes()).decode()}


def test_decode_keeps_values_and_narrows_dtype() -> None:
    ids = np.random.default_rng(0).integers(0, 4, size=(6, 3, 2))
    got = decode_routed_experts(_meta(ids), 7, SPEC, "m")
    assert got.dtype == torch.uint8 and got.shape == (6, 3, 2)
    assert np.array_equal(got.numpy(), ids)
    assert got.numel() * got.element_size() / 7 < 6 * 4  # 6 bytes a token (uint8) vs 24 as SGLang's int32


def test_decode_errors_name_the_field_and_the_fix() -> None:
    with pytest.raises(ServerResponseError, match="--enable-return-routed-experts"):
        decode_routed_experts({}, 7, SPEC, "m")
    with pytest.raises(ServerResponseError, match="m.routed_experts holds 30 ids"):
        decode_routed_experts(_meta(np.zeros((5, 3, 2))), 7, SPEC, "m")
    with pytest.raises(ServerResponseError, match=r"outside \[0, 4\)"):
        decode_routed_experts(_meta(np.full((6, 3, 2), 4)), 7, SPEC, "m")


def test_transfer_carries_the_payload() -> None:
    g = SampleGroup()
    r = torch.randint(0, 200, (4, 3, 2), dtype=torch.uint8)
    g.append(RolloutSample(0, 0, [1, 2], [3, 4, 5], [-1.0] * 3, [0] * 3, "stop", "u", routed_experts=r))
    g.append(RolloutSample(0, 1, [1, 2], [6], [-1.0], [0], "stop", "u"))
    ints, floats = encode_groups({0: [g]})
    (back,) = decode_groups(ints, floats)[0]
    assert back[0].routed_experts.dtype == torch.uint8 and torch.equal(back[0].routed_experts, r)
    assert back[1].routed_experts is None and back[1].response_ids == [6]

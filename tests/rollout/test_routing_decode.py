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
    with pytest.raises(ServerResponseError, match="--enable-return-routed-experts.*sglang-router 0.3.2 drops"):
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


def test_transfer_packs_the_payload_bytes_eight_per_int64() -> None:
    """24 uint8 ids cost 3 int64 words, 7 int16 ids (14 bytes) 2; a sample after them decodes unshifted."""
    g = SampleGroup()
    r8 = torch.randint(0, 256, (4, 3, 2), dtype=torch.uint8)
    r16 = torch.randint(-(2**15), 2**15 - 1, (7, 1, 1), dtype=torch.int16)
    g.append(RolloutSample(0, 0, [1, 2], [3, 4, 5], [-1.0] * 3, [0] * 3, "stop", "u", routed_experts=r8))
    g.append(RolloutSample(0, 1, [1, 2, 3, 4, 5], [6, 7, 8], [-1.0] * 3, [0] * 3, "stop", "u", routed_experts=r16))
    g.append(RolloutSample(0, 2, [9], [10], [-2.0], [1], "length", "u"))
    ints, floats = encode_groups({0: [g]})
    plain = SampleGroup(RolloutSample(s.prompt_index, s.sample_index, s.prompt_ids, s.response_ids, s.logprobs,
                                      s.weight_versions, s.finish_reason, "u") for s in g)
    ints_plain, _ = encode_groups({0: [plain]})
    assert ints.numel() - ints_plain.numel() == (4 + 3) + (4 + 2)  # shape + dtype code, then the packed words
    back = decode_groups(ints, floats)[0][0]
    assert back[0].routed_experts.dtype == torch.uint8 and torch.equal(back[0].routed_experts, r8)
    assert back[1].routed_experts.dtype == torch.int16 and torch.equal(back[1].routed_experts, r16)
    assert back[2].routed_experts is None and back[2].prompt_ids == [9] and back[2].finish_reason == "length"

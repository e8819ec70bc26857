"""SGLang's routed experts (rollout.routing_replay=rollout) -> the sample's compact routing payload.

A server started with ``--enable-return-routed-experts`` answers a /generate request carrying
``return_routed_experts: true`` with ``meta_info.routed_experts``: base64 of int32 expert ids, shape
[prompt + response - 1, num_hidden_layers, top-k] (sglang/srt/state_capturer/routed_experts.py; the last
sampled token never went through the model). ``decode_routed_experts`` checks the size, keeps the MoE layers
and narrows the dtype to the smallest one holding the expert ids (learner/routing_replay.py routing_dtype).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from minpro_megatron.learner.routing_replay import routing_dtype
from minpro_megatron.rollout.types import ServerResponseError

__all__ = ["RoutingSpec", "decode_routed_experts", "SERVER_FLAG"]

SERVER_FLAG = "--enable-return-routed-experts"


@dataclass(frozen=True)
class RoutingSpec:
    """What the payload must look like: the model's layers, which of them are MoE, top-k, experts."""

    num_layers: int
    moe_layers: tuple[int, ...]  # 0-based indices of the MoE layers
    topk: int
    num_experts: int

    @staticmethod
    def for_model(model) -> "RoutingSpec":
        """From a ModelConfig (config/schema.py): every layer is an MoE layer."""
        return RoutingSpec(model.num_layers, tuple(range(model.num_layers)), model.moe_router_topk, model.num_experts)


def decode_routed_experts(meta: dict, n_tokens: int, spec: RoutingSpec, where: str) -> torch.Tensor:
    """``meta_info.routed_experts`` of one output -> [n_tokens - 1, MoE layers, top-k] in routing_dtype."""
    raw = meta.get("routed_experts") if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise ServerResponseError(
            f"{where}.routed_experts is missing or not a base64 string (got {type(raw).__name__}); with "
            f"rollout.routing_replay=rollout the servers need {SERVER_FLAG} (the fleet adds it to servers it starts; "
            "add it to servers you run yourself), and requests must reach them directly: sglang-router 0.3.2 drops "
            "the request's return_routed_experts (the fleet's routing client bypasses the router)"
        )
    ids = np.frombuffer(base64.b64decode(raw), dtype=np.int32)
    rows = n_tokens - 1
    if ids.size != rows * spec.num_layers * spec.topk:
        raise ServerResponseError(
            f"{where}.routed_experts holds {ids.size} ids; expected (prompt + response - 1 = {rows}) x "
            f"{spec.num_layers} layers x top-k {spec.topk} = {rows * spec.num_layers * spec.topk}"
        )
    arr = ids.reshape(rows, spec.num_layers, spec.topk)[:, list(spec.moe_layers)]
    if arr.size and (arr.min() < 0 or arr.max() >= spec.num_experts):
        raise ServerResponseError(
            f"{where}.routed_experts has expert ids in [{arr.min()}, {arr.max()}], outside [0, {spec.num_experts})"
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).to(routing_dtype(spec.num_experts))

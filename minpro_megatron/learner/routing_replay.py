"""Rollout routing replay (R3): the learner's MoE routers take the experts the rollout engine chose.

Payload. A sample's routing is an integer tensor ``[N, L, k]``: N tokens from the first one (prompt then
response), L = the model's MoE layers in layer order, k = ``model.moe_router_topk``, in the smallest
integer dtype holding the expert ids (``routing_dtype``). N is the sequence length minus one (what SGLang
returns: the last sampled token never went through the model) or the full length. The learner's output at
the last position scores nothing, so that token's routing (and that of padding) is a fixed valid choice.

Replay. megatron-core's ``RouterReplay`` (megatron/core/transformer/moe/router_replay.py, built when
``TransformerConfig.moe_enable_routing_replay``) sits in every TopKRouter; ``replaying`` sets each router of
one model chunk to REPLAY_FORWARD with the indices of its own layer (``router.layer_number``: global, so
every pipeline stage and virtual chunk picks its own layers) for the tokens this rank routes: the CP-local
zigzag slice (``pack_routing`` follows the tokens through ``ZigzagLayout``) and, with sequence
parallelism, this TP rank's contiguous sub-slice of it. ``recording`` captures what the routers choose.

Agreement. With a ``RoutingTally``, ``replaying`` also computes each router's own top-k from its scores and
counts the (token, MoE layer) pairs whose expert set equals the replayed one, over the tokens that score a
next token (``routing_valid``): the trainer's ``mismatch/routing_agree_frac``, i.e. how often the learner
would have routed like the rollout engine without replay (1 - it is the share of routing decisions R3 fixes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from minpro_megatron.config import ConfigError
from minpro_megatron.parallel.cp_layout import ZigzagLayout

__all__ = [
    "routing_dtype",
    "check_replay_supported",
    "moe_layer_numbers",
    "routers_of",
    "pack_routing",
    "routing_valid",
    "RoutingTally",
    "rank_slice",
    "replaying",
    "recording",
    "gather_recorded",
]


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype holding expert ids 0..num_experts-1 (the payload's dtype)."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def check_replay_supported() -> None:
    """Raise ConfigError naming rollout.routing_replay when this megatron-core has no RouterReplay."""
    try:
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction  # noqa: F401
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError as e:
        raise ConfigError(
            f"rollout.routing_replay=rollout needs megatron-core with RouterReplay (0.16 or newer): {e}; "
            "upgrade megatron-core or set rollout.routing_replay=off"
        ) from e
    if "moe_enable_routing_replay" not in TransformerConfig.__dataclass_fields__:
        raise ConfigError(
            "rollout.routing_replay=rollout: this megatron-core's TransformerConfig has no moe_enable_routing_replay; "
            "upgrade megatron-core (0.16 or newer) or set rollout.routing_replay=off"
        )


def moe_layer_numbers(config: Any) -> list[int]:
    """Global 1-based numbers of the MoE layers (megatron's moe_layer_freq: an int period or a 0/1 list)."""
    if not getattr(config, "num_moe_experts", None):
        return []
    freq = getattr(config, "moe_layer_freq", 1)
    n = config.num_layers
    if isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(n)]
    else:
        pattern = list(freq)
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def routers_of(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(MoE-layer index into the payload's L axis, RouterReplay) of every router of one model chunk."""
    root = model
    while hasattr(root, "module") and isinstance(root.module, torch.nn.Module):
        root = root.module
    config = root.config
    numbers = {num: i for i, num in enumerate(moe_layer_numbers(config))}
    out = []
    for m in root.modules():
        replay = getattr(m, "router_replay", None)
        if replay is None or not hasattr(m, "topk"):
            continue
        if m.layer_number not in numbers:
            raise RuntimeError(f"router of layer {m.layer_number} is not among the MoE layers {sorted(numbers)}")
        out.append((numbers[m.layer_number], replay))
    return out


def _full_length(routing: torch.Tensor, seqlen: int, topk: int) -> torch.Tensor:
    """[N, L, k] with N in {seqlen - 1, seqlen} -> int64 [seqlen, L, k] (missing last token: experts 0..k-1)."""
    r = routing.to(torch.int64)
    if r.shape[0] == seqlen:
        return r
    tail = torch.arange(topk, dtype=torch.int64).expand(seqlen - r.shape[0], r.shape[1], topk)
    return torch.cat([r, tail])


def pack_routing(routings: Sequence[torch.Tensor], layout: ZigzagLayout, topk: int) -> torch.Tensor:
    """Per-sample payloads -> this CP rank's int64 ``[T_local, L, k]``, token for token with the packed inputs
    (layout.pad then layout.split, as learner/batch.py packs every per-position value)."""
    seqlens = [int(x) for x in layout.seqlens]
    full = torch.cat([_full_length(r, n, topk) for r, n in zip(routings, seqlens)])
    padded = layout.pad(full, 0)
    valid = layout.pad(torch.ones(full.shape[0], dtype=torch.bool), False)
    padded[~valid] = torch.arange(topk, dtype=torch.int64)  # distinct experts: a valid routing for padding
    return layout.split(padded)


def routing_valid(layout: ZigzagLayout) -> torch.Tensor:
    """This CP rank's bool ``[T_local]``, token for token with ``pack_routing``: True at every position that
    scores a next token (each sequence's first seqlen - 1), False at last tokens and padding."""
    seqlens = [int(x) for x in layout.seqlens]
    full = torch.cat([torch.arange(n) < n - 1 for n in seqlens])
    return layout.split(layout.pad(full, False))


class RoutingTally:
    """(token, MoE layer) pairs counted by ``replaying``, per MoE-layer index: ``agree[l]`` of ``total[l]``
    where the router's own top-k expert set equals the replayed one. A router sees the hidden states of the
    replayed layers below it, so each layer's count is conditional on the replayed routing upstream."""

    def __init__(self) -> None:
        self.agree: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def add(self, layer: int, agree: int, total: int) -> None:
        self.agree[layer] = self.agree.get(layer, 0) + agree
        self.total[layer] = self.total.get(layer, 0) + total


def _counting(replay: Any, layer: int, valid: torch.Tensor, tally: RoutingTally) -> Any:
    """``replay.get_replay_topk`` that also tallies the router's own choice against the replayed one."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    original = replay.get_replay_topk

    def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        out = original(scores, topk, num_groups, group_topk, default_compute_topk)
        if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD and default_compute_topk is not None:
            with torch.no_grad():
                _, own = default_compute_topk(scores.detach(), topk, num_groups=num_groups, group_topk=group_topk)
                same = (own.sort(1).values == out[1].to(own.device).sort(1).values).all(1)
                v = valid.to(same.device)[: same.shape[0]]
                tally.add(layer, int(same[: v.shape[0]][v].sum()), int(v.sum()))
        return out

    return get_replay_topk


def rank_slice(local: torch.Tensor, tp_size: int, tp_rank: int, sequence_parallel: bool) -> torch.Tensor:
    """The tokens this TP rank's routers see: with sequence parallelism its contiguous 1/TP of the CP-local
    tokens (megatron's [s/tp, b=1] shard), else all of them."""
    if not sequence_parallel or tp_size == 1:
        return local
    n = local.shape[0] // tp_size
    return local[tp_rank * n : (tp_rank + 1) * n]


@contextmanager
def replaying(model: torch.nn.Module, routing: torch.Tensor | None, valid: torch.Tensor | None = None,
              tally: RoutingTally | None = None) -> Iterator[None]:
    """Within the block, every router of ``model`` replays ``routing`` ([tokens it routes, L, k], int64);
    ``None``: the routers choose themselves. ``tally`` (with ``valid``, bool [tokens it routes]): count how
    often the routers' own choice agrees with the replayed one."""
    if routing is None:
        yield
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = routers_of(model)
    if not routers:
        raise RuntimeError("routing replay: the model chunk has no router with RouterReplay "
                           "(build the TransformerConfig with moe_enable_routing_replay=True)")
    device = next(model.parameters()).device
    routing = routing.to(device)
    for idx, r in routers:
        r.set_target_indices(routing[:, idx, :].contiguous())
        r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        if tally is not None and valid is not None:
            r.get_replay_topk = _counting(r, idx, valid, tally)  # instance attribute: shadows the method in the block
    try:
        yield
    finally:
        for _, r in routers:
            r.clear_router_replay_action()
            r.clear_indices()
            r.__dict__.pop("get_replay_topk", None)


@contextmanager
def recording(model: torch.nn.Module, out: dict[int, torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block the routers of ``model`` record their choices; on exit ``out`` maps MoE-layer index ->
    int64 [tokens this rank routed, k] (the layers of this pipeline stage / chunk only)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = routers_of(model)
    for _, r in routers:
        r.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield out
        for idx, r in routers:
            rec = r.get_recorded_indices()
            if rec is not None:
                out[idx] = rec.detach().to("cpu", torch.int64)
    finally:
        for _, r in routers:
            r.clear_router_replay_action()
            r.clear_indices()


def gather_recorded(
    records: Sequence[dict[int, torch.Tensor]],
    layout: ZigzagLayout,
    num_moe_layers: int,
    topk: int,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    sequence_parallel: bool = False,
    groups: Sequence[Any] = (),
) -> list[torch.Tensor]:
    """What the routers of one forward recorded (``records``: one dict per model chunk of this rank, see
    ``recording``) -> each sequence's full routing int64 ``[seqlen, L, k]``, identical on every rank.

    Each rank knows its own tokens (CP-local zigzag slice, its SP shard of it) of its own layers (PP stage,
    virtual chunks); a MAX all-reduce over ``groups`` (TP x PP, then CP) fills in the rest (unknown = -1)."""
    import torch.distributed as dist

    full = torch.full((layout.total_padded, num_moe_layers, topk), -1, dtype=torch.int64)
    positions = rank_slice(layout.local_index, tp_size, tp_rank, sequence_parallel)
    for rec in records:
        for idx, chosen in rec.items():
            full[positions, idx] = chosen.to(torch.int64)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(full, op=dist.ReduceOp.MAX, group=group)
    full = layout.unpad(full)
    if bool((full < 0).any()):
        raise RuntimeError("routing replay: some token's routing was recorded by no rank (a layer or token slice is missing)")
    return list(torch.split(full, [int(n) for n in layout.seqlens]))

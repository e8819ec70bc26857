"""Move prompts and rollout samples between ranks as tensors (no pickling of data that crosses the network).

    ints, floats = encode_groups(groups_by_rank)      # on the driver
    ints, floats = broadcast_tensors(ints, floats)    # every rank
    groups_by_rank = decode_groups(ints, floats)      # {dp_rank: [SampleGroup, ...]}
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.rollout.types import RolloutSample, SampleGroup, WeightVersionSpan

__all__ = ["encode_groups", "decode_groups", "encode_prompts", "decode_prompts", "broadcast_tensors", "gather_prompts"]

_FINISH = {"stop": 0, "length": 1, "abort": 2}
_FINISH_NAME = {v: k for k, v in _FINISH.items()}
_DTYPE_CODE = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


def encode_groups(groups_by_rank: Mapping[int, Sequence[SampleGroup]]) -> tuple[torch.Tensor, torch.Tensor]:
    ints: list[int] = [len(groups_by_rank)]
    floats: list[float] = []
    for rank, groups in sorted(groups_by_rank.items()):
        ints += [rank, len(groups)]
        for g in groups:
            ints.append(len(g))
            for s in g:
                ints += [s.prompt_index, s.sample_index, len(s.prompt_ids), len(s.response_ids), _FINISH[s.finish_reason]]
                ints += list(s.prompt_ids) + list(s.response_ids) + list(s.weight_versions)
                floats += list(s.logprobs)
                r = s.routed_experts  # rollout.routing_replay: [tokens - 1, L, k], its bytes packed 8 per int64
                ints += [0] if r is None else [1, *r.shape, _DTYPE_CODE[r.dtype], *_pack_bytes(r)]
    return torch.tensor(ints, dtype=torch.int64), torch.tensor(floats, dtype=torch.float64)


def decode_groups(ints: torch.Tensor, floats: torch.Tensor, server_url: str = "sglang") -> dict[int, list[SampleGroup]]:
    it, fl = ints.tolist(), floats.tolist()
    pos, fpos = 1, 0
    out: dict[int, list[SampleGroup]] = {}
    for _ in range(it[0]):
        rank, n_groups = it[pos], it[pos + 1]
        pos += 2
        groups = []
        for _ in range(n_groups):
            n = it[pos]
            pos += 1
            g = SampleGroup()
            for _ in range(n):
                p_idx, s_idx, plen, rlen, fin = it[pos : pos + 5]
                pos += 5
                prompt = it[pos : pos + plen]
                pos += plen
                resp = it[pos : pos + rlen]
                pos += rlen
                versions = it[pos : pos + rlen]
                pos += rlen
                lps = fl[fpos : fpos + rlen]
                fpos += rlen
                routed = None
                if it[pos]:
                    n, layers, k, code = it[pos + 1 : pos + 5]
                    pos += 5
                    dtype = _CODE_DTYPE[code]
                    nbytes = n * layers * k * dtype.itemsize
                    words = -(-nbytes // 8)
                    raw = ints[pos : pos + words].contiguous().view(torch.uint8)[:nbytes]
                    routed = raw.view(dtype).reshape(n, layers, k).clone()
                    pos += words
                else:
                    pos += 1
                g.append(
                    RolloutSample(
                        prompt_index=p_idx, sample_index=s_idx, prompt_ids=prompt, response_ids=resp, logprobs=lps,
                        weight_versions=versions, finish_reason=_FINISH_NAME[fin], server_url=server_url,  # type: ignore[arg-type]
                        version_spans=_spans(versions), routed_experts=routed,
                    )
                )
            groups.append(g)
        out[rank] = groups
    return out


def _pack_bytes(t: torch.Tensor) -> list[int]:
    """The bytes of ``t`` as int64 words (zero-padded to a multiple of 8): a uint8 routing payload costs 1/8
    of an int64 per id, not a whole one."""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 8
    if pad:
        raw = torch.cat([raw, torch.zeros(pad, dtype=torch.uint8)])
    return raw.view(torch.int64).tolist()


def _spans(versions: Sequence[int]) -> list[WeightVersionSpan]:
    spans: list[WeightVersionSpan] = []
    for i, v in enumerate(versions):
        if spans and spans[-1].version == v:
            spans[-1] = WeightVersionSpan(v, spans[-1].start, i + 1)
        else:
            spans.append(WeightVersionSpan(v, i, i + 1))
    return spans


def encode_prompts(prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    ints = [len(prompts)]
    for p in prompts:
        ints += [len(p), *p]
    return torch.tensor(ints, dtype=torch.int64)


def decode_prompts(t: torch.Tensor) -> list[list[int]]:
    it = t.tolist()
    out, pos = [], 1
    for _ in range(it[0]):
        n = it[pos]
        out.append(it[pos + 1 : pos + 1 + n])
        pos += 1 + n
    return out


def broadcast_tensors(*tensors: torch.Tensor | None, src: int = 0, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Broadcast 1-D tensors of any length from ``src`` (sizes first); non-src ranks may pass None."""
    if dist.get_world_size(group) == 1:
        return [t for t in tensors]  # type: ignore[misc]
    me = dist.get_rank()
    sizes = torch.tensor([t.numel() if me == src else 0 for t in tensors], dtype=torch.int64)
    dist.broadcast(sizes, src=src, group=group)
    dtypes = [torch.int64, torch.float64] if len(tensors) == 2 else [torch.int64] * len(tensors)
    out = []
    for t, n, dt in zip(tensors, sizes.tolist(), dtypes):
        buf = t.contiguous() if me == src else torch.empty(n, dtype=t.dtype if t is not None else dt)
        dist.broadcast(buf, src=src, group=group)
        out.append(buf)
    return out


def gather_prompts(prompts: Sequence[Sequence[int]], contribute: bool, dst: int = 0) -> list[list[list[int]]] | None:
    """Every rank sends its prompt list (or nothing, when ``contribute`` is False) to ``dst``; returns the
    lists by global rank on ``dst``, None elsewhere."""
    mine = encode_prompts(prompts if contribute else [])
    world = dist.get_world_size()
    if world == 1:
        return [decode_prompts(mine)]
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64))
    width = max(int(s) for s in sizes)
    padded = torch.zeros(width, dtype=torch.int64)
    padded[: mine.numel()] = mine
    bufs = [torch.empty(width, dtype=torch.int64) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(padded, bufs, dst=dst)
    if bufs is None:
        return None
    return [decode_prompts(b[: int(s)]) for b, s in zip(bufs, sizes)]

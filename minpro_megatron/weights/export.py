"""Stream a live, sharded Megatron model as Hugging Face-named full tensors in size-bounded buckets.

    exporter = HFExporter(learner.model, cfg.model)               # every rank, once (collective)
    for bucket in exporter.buckets(bucket_bytes=512 << 20):       # every rank (collective)
        transport.push(bucket)                                    # the body runs on rank ``dst`` only

Collective: every rank of the job calls ``buckets`` and iterates it to the end; only ``dst`` (global rank
0 by default: the trainer rank that talks to the rollout servers) receives buckets, the other ranks' loops
have no iterations. A rank that stops iterating early leaves the others blocked in a send.

How a parameter reaches ``dst``: once, at construction, every rank describes its parameters (canonical
name from convert/layout.py: PP layer offsets, EP local -> global expert ids, TE names; which TP /
expert-TP shard it holds). From the union, one *source* is chosen per (tensor, shard): the lowest global
rank holding it, so DP / CP / expert-DP replicas send nothing. Then, bucket by bucket, the sources send
their shards point-to-point to ``dst``, which merges them (TP chunks, SwiGLU [gate; up] per rank),
splits them into HF tensors (QKV de-interleave per query group, vocab padding stripped) and yields
them. Each HF tensor is produced exactly once; the bytes crossing the network are the model's size, once,
and ``dst`` holds at most one bucket (plus its shards) at a time.

Alternative not taken: slime-style TP/EP all-gathers on every rank, then one push per pipeline stage.
That moves (TP-1)x more bytes and needs every stage to talk to the servers; gathering to one rank keeps
the transport (weights/sync.py) unchanged. Tensors handed out may alias live parameters on ``dst``
(when ``dst`` holds a whole tensor in the export dtype): consume each bucket before the next optimizer step.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.config import ModelConfig
from minpro_megatron.convert.layout import LocalParam, local_params, merge_shards
from minpro_megatron.convert.mapping import Geometry, ParamMap, param_maps, to_hf
from minpro_megatron.convert.buckets import Bucket, iter_buckets

__all__ = ["ExportError", "HFExporter", "export_hf_buckets"]


# one Megatron tensor's HF tensors -> the tensors to push instead (weights/quantize.py RolloutQuantizer)
Transform = Callable[[list[tuple[str, torch.Tensor]]], list[tuple[str, torch.Tensor]]]


class ExportError(RuntimeError):
    """The ranks' parameters do not cover the model exactly once per shard (names the tensor)."""


@dataclass(frozen=True)
class _Piece:
    canonical: str
    shard_rank: int
    num_shards: int
    shard_dim: int | None
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Planned:
    map: ParamMap
    shard_dim: int | None
    pieces: tuple[tuple[int, _Piece], ...]  # (source global rank, piece) in shard order


class HFExporter:
    """The transfer plan of one model layout (build once per layout; collective)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], model: ModelConfig, *, dst: int = 0):
        self.model = model
        self.dst = dst
        self.geo = Geometry.of(model)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        if not 0 <= dst < world:
            raise ValueError(f"dst={dst} is not a rank of this job (world size {world})")
        all_maps = param_maps(model)
        maps = [pm for pm in all_maps if pm.export]
        # tied output_layer copies (last PP stage) are not exported: HF ties lm_head to the embedding
        self._local: dict[tuple[str, int], LocalParam] = {
            (lp.canonical, lp.shard_rank): lp for lp in local_params(model_chunks, all_maps) if lp.map.export
        }
        mine = [
            _Piece(lp.canonical, lp.shard_rank, lp.num_shards, lp.shard_dim, tuple(lp.tensor.shape), str(lp.tensor.dtype))
            for lp in self._local.values()
        ]
        every: list = [mine]
        if world > 1:
            from minpro_megatron.parallel.json_collectives import all_gather_json

            every = [[_Piece(*(tuple(v) if isinstance(v, list) else v for v in p)) for p in pieces]
                     for pieces in all_gather_json([dataclasses.astuple(p) for p in mine])]
        self.plan = _plan(maps, every)
        self.device = next(iter(self._local.values())).tensor.device if self._local else torch.device("cpu")

    def hf_names(self) -> list[str]:
        return [n for p in self.plan for n in p.map.hf]

    def buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None, transform: Transform | None = None) -> Iterator[Bucket]:
        """HF-named full tensors in buckets of at most ``bucket_bytes`` (a larger tensor travels alone);
        ``dtype`` casts them (default: the parameters' dtype). ``transform`` rewrites the HF tensors of
        one Megatron tensor at a time (q/k/v or gate/up together), e.g. into a quantized rollout format
        (weights/quantize.py). Yields on ``dst`` only."""
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1 (rollout.bucket_mb)")
        group: list[_Planned] = []
        size = 0
        for planned in self.plan:
            itemsize = _dtype(planned.pieces[0][1].dtype).itemsize
            n = planned.map.hf_numel * (dtype.itemsize if dtype else itemsize)
            if group and size + n > bucket_bytes:
                yield from self._transfer(group, bucket_bytes, dtype, transform)
                group, size = [], 0
            group.append(planned)
            size += n
        if group:
            yield from self._transfer(group, bucket_bytes, dtype, transform)

    def _transfer(self, group: list[_Planned], bucket_bytes: int, dtype: torch.dtype | None,
                  transform: Transform | None = None) -> Iterator[Bucket]:
        ops: list = []
        received: dict[tuple[str, int], torch.Tensor] = {}
        tag = 0
        for planned in group:
            for src, piece in planned.pieces:
                tag += 1
                if src == self.dst:
                    continue
                if self.rank == src:
                    ops.append(dist.P2POp(dist.isend, self._local[(piece.canonical, piece.shard_rank)].tensor.detach(), self.dst, tag=tag))
                elif self.rank == self.dst:
                    buf = torch.empty(piece.shape, dtype=_dtype(piece.dtype), device=self.device)
                    received[(piece.canonical, piece.shard_rank)] = buf
                    ops.append(dist.P2POp(dist.irecv, buf, src, tag=tag))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if self.rank != self.dst:
            return
        named: list[tuple[str, torch.Tensor]] = []
        for planned in group:
            shards = [
                received.get((p.canonical, p.shard_rank)) if src != self.dst else self._local[(p.canonical, p.shard_rank)].tensor.detach()
                for src, p in planned.pieces
            ]
            full = merge_shards(shards, planned.shard_dim, planned.map.kind == "glu")
            hf = [(name, t if dtype is None or t.dtype == dtype else t.to(dtype)) for name, t in to_hf(planned.map, full, self.geo)]
            named.extend(transform(hf) if transform is not None else hf)  # after the cast: scales keep their dtype
            del shards, full
        received.clear()
        yield from iter_buckets(named, bucket_bytes)


def export_hf_buckets(
    model_chunks: Sequence[torch.nn.Module],
    model: ModelConfig,
    *,
    bucket_bytes: int,
    dst: int = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[Bucket]:
    """One-shot form of ``HFExporter(model_chunks, model, dst=dst).buckets(bucket_bytes, dtype)``
    (keep an HFExporter to skip the planning collective on later syncs)."""
    yield from HFExporter(model_chunks, model, dst=dst).buckets(bucket_bytes, dtype)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _plan(maps: list[ParamMap], every: list[list[_Piece]]) -> list[_Planned]:
    """For each exported tensor (HF order), the source rank of each shard; checks the cover is exact."""
    holders: dict[str, dict[int, tuple[int, _Piece]]] = {}
    for rank, pieces in enumerate(every):
        for piece in pieces:
            shards = holders.setdefault(piece.canonical, {})
            have = shards.get(piece.shard_rank)
            if have is not None and (have[1].shape, have[1].num_shards) != (piece.shape, piece.num_shards):
                raise ExportError(
                    f"{piece.canonical} shard {piece.shard_rank}: rank {have[0]} holds {have[1].shape} of "
                    f"{have[1].num_shards} shards, rank {rank} {piece.shape} of {piece.num_shards}"
                )
            if have is None or rank < have[0]:
                shards[piece.shard_rank] = (rank, piece)
    out: list[_Planned] = []
    for pm in maps:
        shards = holders.pop(pm.megatron, None)
        if not shards:
            raise ExportError(f"no rank holds {pm.megatron} (HF {list(pm.hf)}): the model chunks do not cover the model")
        n = next(iter(shards.values()))[1].num_shards
        if sorted(shards) != list(range(n)) or any(p.num_shards != n for _, p in shards.values()):
            raise ExportError(f"{pm.megatron}: shards {sorted(shards)} of {n} are held; some TP/expert-TP shard is missing")
        pieces = tuple(shards[i] for i in range(n))
        out.append(_Planned(pm, pieces[0][1].shard_dim, pieces))
    if holders:
        raise ExportError(f"parameters outside the export mapping: {sorted(holders)[:5]}")
    return out

"""Small metadata between ranks as JSON in uint8 tensors, instead of torch's pickle-based object
collectives (all_gather_object / broadcast_object_list unpickle whatever arrives over the network)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_json", "broadcast_json"]


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


def all_gather_json(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order of ``group``."""
    world = dist.get_world_size(group)
    if world == 1:
        return [json.loads(json.dumps(obj))]
    data = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    width = max(int(s) for s in sizes)
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.empty(width, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [_decode(p[: int(s)]) for p, s in zip(parts, sizes)]


def broadcast_json(obj: Any, src: int, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group`` (others pass anything, e.g. None)."""
    if dist.get_world_size(group) == 1:
        return obj
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    data = _encode(obj) if dist.get_rank() == src else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=src, group=group)
    buf = data.to(dev) if dist.get_rank() == src else torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=src, group=group)
    return _decode(buf.cpu())

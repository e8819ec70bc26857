"""Size-bounded buckets of (hf_name, tensor) pairs and their flattened form.

A *bucket* is a list of (hf_name, tensor) pairs whose bytes add up to at most the cap (a single tensor
larger than the cap travels alone). The learner's exporter yields buckets; ``iter_buckets`` cuts any
(name, tensor) stream into them (tests use an HF state dict).

``FlatBucket`` is the wire form of SGLang's ``load_format="flattened_bucket"``: one uint8 tensor holding
the tensors' bytes back to back, plus names/dtypes/shapes. The receiver rebuilds offsets from the
names/dtypes/shapes alone (sglang FlattenedTensorBucket.empty) and refuses a tensor whose byte offset
is not a multiple of its itemsize, so tensors are laid out by descending itemsize: every offset then
stays aligned (itemsizes are powers of two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

__all__ = ["Bucket", "iter_buckets", "bucket_nbytes", "FlatBucket", "dtype_name", "validate_bucket"]

Bucket = list[tuple[str, torch.Tensor]]

_SUPPORTED = {torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.int8,
              torch.float8_e4m3fn}  # fp8: quantized rollout weights (weights/quantize.py)


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.bfloat16' -> 'bfloat16' (what SGLang's getattr(torch, name) expects)."""
    return str(dtype).removeprefix("torch.")


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def validate_bucket(bucket: Sequence[tuple[str, torch.Tensor]], where: str = "bucket") -> None:
    if not bucket:
        raise ValueError(f"{where} is empty; the exporter must not yield empty buckets")
    seen: set[str] = set()
    for name, t in bucket:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: tensor name {name!r} must be a non-empty HF parameter name")
        if name in seen:
            raise ValueError(f"{where}: tensor {name!r} appears twice")
        seen.add(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"{where}: {name!r} has dtype {t.dtype}; supported: {sorted(map(dtype_name, _SUPPORTED))}")


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group consecutive (name, tensor) pairs into buckets of at most ``bucket_bytes`` bytes."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1 (rollout.bucket_mb)")
    cur: Bucket = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        yield cur


@dataclass
class FlatBucket:
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    flat: torch.Tensor  # uint8, 1-D

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    @classmethod
    def from_bucket(
        cls, bucket: Sequence[tuple[str, torch.Tensor]], device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> "FlatBucket":
        """``out``: a 1-D uint8 buffer of at least ``bucket_nbytes(bucket)`` bytes to write into (``flat`` is
        then its prefix): each tensor is copied once, straight into its slot, with no fresh allocation."""
        validate_bucket(bucket)
        # stable sort by descending itemsize keeps every byte offset aligned for the receiver
        ordered = sorted(bucket, key=lambda nt: -nt[1].element_size())
        if out is not None:
            nbytes = bucket_nbytes(ordered)
            if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < nbytes:
                raise ValueError(f"out must be a 1-D uint8 tensor of >= {nbytes} bytes, got {out.dtype} {tuple(out.shape)}")
            flat, off = out[:nbytes], 0
            for _, t in ordered:
                n = t.numel() * t.element_size()
                flat[off:off + n].view(t.dtype).view(t.shape).copy_(t.detach())
                off += n
            return cls([n for n, _ in ordered], [dtype_name(t.dtype) for _, t in ordered],
                       [list(t.shape) for _, t in ordered], flat)
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in ordered]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if device is not None:
            flat = flat.to(device)
        return cls(
            names=[n for n, _ in ordered],
            dtypes=[dtype_name(t.dtype) for _, t in ordered],
            shapes=[list(t.shape) for _, t in ordered],
            flat=flat,
        )

    def offsets(self) -> list[tuple[int, int]]:
        """[start, end) byte range of each tensor, computed as the receiver does."""
        out, off = [], 0
        for dt, shape in zip(self.dtypes, self.shapes):
            size = int(torch.Size(shape).numel()) * getattr(torch, dt).itemsize
            if off % getattr(torch, dt).itemsize:
                raise AssertionError(f"unaligned offset {off} for {dt}")
            out.append((off, off + size))
            off += size
        return out

    def unflatten(self) -> Bucket:
        """The (name, tensor) pairs back (views into ``flat``); what SGLang's receiver reconstructs."""
        return [
            (n, self.flat[a:b].view(getattr(torch, dt)).reshape(shape))
            for n, dt, shape, (a, b) in zip(self.names, self.dtypes, self.shapes, self.offsets())
        ]

"""Segmented inclusive scans over a 1-D tensor whose segments are contiguous runs of equal ids.

torch has no segmented scan, so each op gets the cheapest exact form:
- min: one ``torch.cummin`` over int64 keys ``(-segment << 32) + ordered_int32(value)``. Keys of a later
  segment are below every key of an earlier one, so the running minimum restarts at each boundary, and
  subtracting the segment's offset decodes the float32 value bit for bit. (float64: Hillis-Steele.)
- sum: float64 ``cumsum`` minus the running total at the segment start (error ~1e-16 x |running total|).
- logaddexp: Hillis-Steele doubling in float64 (log-space sums of ratios, no overflow, no cancellation).
Neutral elements (+inf for min, 0 for sum, -inf for logaddexp) are the caller's job.
"""

from __future__ import annotations

from typing import Literal

import torch

ScanOp = Literal["min", "sum", "logaddexp"]

NEUTRAL: dict[str, float] = {"min": float("inf"), "sum": 0.0, "logaddexp": float("-inf")}

__all__ = ["ScanOp", "NEUTRAL", "segmented_inclusive_scan", "segment_starts", "combine", "float32_ordered_bits"]


def combine(op: ScanOp, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op == "min":
        return torch.minimum(a, b)
    if op == "sum":
        return a + b
    if op == "logaddexp":
        return torch.logaddexp(a, b)
    raise ValueError(f"unknown scan op {op!r}; choose min, sum or logaddexp")


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask: True where a new segment begins (segment ids must be non-decreasing)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    if segment_ids.numel() > 1:
        starts[1:] = segment_ids[1:] != segment_ids[:-1]
    return starts


def segmented_inclusive_scan(
    values: torch.Tensor, segment_ids: torch.Tensor, op: ScanOp, segment_offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Inclusive scan of ``values`` restarting at every change of ``segment_ids`` (dense, non-decreasing:
    0, 0, 1, 1, 1, 2, ...). ``segment_offsets`` (``-segment_ids << 32``) may be passed in when cached.

    Returns float32 for op='min' on <= 32-bit inputs (exact), float64 otherwise.
    """
    if values.dim() != 1 or segment_ids.shape != values.shape:
        raise ValueError(
            f"segmented scan expects 1-D values and segment ids of the same shape, got {tuple(values.shape)} "
            f"and {tuple(segment_ids.shape)}"
        )
    if values.numel() == 0:
        return values.to(torch.float64 if op != "min" else values.dtype)
    if op == "min":
        if values.dtype == torch.float64:
            return _hillis_steele(values, segment_ids, op)
        if segment_offsets is None:
            segment_offsets = -segment_ids.to(torch.int64) << 32
        return _segmented_cummin_f32(values.float(), segment_offsets)
    if op == "sum":
        return _segmented_cumsum_f64(values.double(), segment_ids)
    if op == "logaddexp":
        return _hillis_steele(values.double(), segment_ids, op)
    raise ValueError(f"unknown scan op {op!r}; choose min, sum or logaddexp")


def float32_ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 in [0, 2^32) preserving order (-inf < ... < -0 <= +0 < ... < +inf)."""
    return _ordered_int32(x.contiguous()).to(torch.int64) + (1 << 31)


def _ordered_int32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order; an involution on the bit pattern (its own inverse)."""
    b = x.view(torch.int32)
    # Negative floats: flip the magnitude bits so larger magnitudes sort lower; the sign bit stays.
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _segmented_cummin_f32(values: torch.Tensor, segment_offsets: torch.Tensor) -> torch.Tensor:
    if torch.isnan(values).any():
        raise ValueError("segmented min scan got NaN values; mask them out (neutral +inf) first")
    keys = segment_offsets + _ordered_int32(values.contiguous())
    running = torch.cummin(keys, 0).values
    ordered = (running - segment_offsets).to(torch.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _segmented_cumsum_f64(values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    total = torch.cumsum(values, 0)
    starts = segment_starts(segment_ids)
    # Running total just before each segment's first element, broadcast over the segment.
    before = torch.where(starts, total - values, torch.zeros_like(total))
    rank = torch.cumsum(starts.to(torch.int64), 0) - 1
    base = before[starts][rank]
    return total - base


def _hillis_steele(values: torch.Tensor, segment_ids: torch.Tensor, op: ScanOp) -> torch.Tensor:
    """O(T log L) doubling scan; exact for min, well-conditioned for logaddexp."""
    out = values.clone()
    n = out.numel()
    # Only as many doublings as the longest segment needs.
    starts_idx = torch.nonzero(segment_starts(segment_ids)).flatten()
    lengths = torch.diff(torch.cat([starts_idx, starts_idx.new_tensor([n])]))
    longest = int(lengths.max())
    step = 1
    while step < longest:
        same = segment_ids[step:] == segment_ids[:-step]
        merged = torch.where(same, combine(op, out[step:], out[:-step]), out[step:])
        out = torch.cat([out[:step], merged])
        step *= 2
    return out

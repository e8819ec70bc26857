"""Cross-CP-rank segmented scans: exclusive prefixes and whole-sequence totals of packed sequences.

Log-probs stay local to each context-parallel rank. For a sequence split into 2*cp zigzag chunks, the
prefix of a token in chunk k needs the totals of chunks 0..k-1, which live on other ranks. Each call:

1. scans every local chunk on its own (segmented inclusive scan, one kernel per op),
2. exchanges one summary per (sequence, local chunk) -- the chunk total and its count of valid
   elements -- with ONE all_gather over the CP group: [local_chunks, 2 * n_scans] float64 per rank,
3. combines the totals of the earlier chunks into a carry and applies it to the local scan.

Communication is O(sequences * cp), independent of sequence length, and there is no backward
communication: the scanned statistics are used under stop-gradient (MinPRO, metrics) or as totals
whose gradient is re-attached locally (GSPO, see losses/gspo.py).

Exactness: min scans are bit-identical to a single-rank scan; sum and logaddexp scans differ only by
floating-point summation order (float64 accumulation, ~1e-15 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.segmented import NEUTRAL, ScanOp, combine, segmented_inclusive_scan

__all__ = [
    "ScanRequest",
    "ScanResult",
    "cp_segmented_scans",
    "cp_segmented_scan",
    "simulate_cp_scans",
    "comm_bytes_per_call",
]


@dataclass(frozen=True)
class ScanRequest:
    """Scan ``values`` with ``op`` over the tokens where ``valid`` is True (others are neutral)."""

    values: torch.Tensor
    op: ScanOp


@dataclass
class ScanResult:
    """Per local token: exclusive prefix (op over valid elements strictly before it in its sequence) and,
    when counts were requested, the number of those elements; per sequence: the total over all chunks.
    Empty prefixes hold the op's neutral element (+inf for min, 0 for sum, -inf for logaddexp)."""

    exclusive: torch.Tensor  # [T_local] float64 (float32 for min on <=32-bit input)
    seq_total: torch.Tensor  # [S]
    exclusive_count: torch.Tensor | None = None  # [T_local] int64
    seq_count: torch.Tensor | None = None  # [S] int64

    def inclusive(self, values: torch.Tensor, valid: torch.Tensor, op: ScanOp) -> torch.Tensor:
        """Prefix including the current token (tokens that are not valid keep the exclusive value)."""
        v = values.to(self.exclusive.dtype)
        return torch.where(valid, combine(op, self.exclusive, v), self.exclusive)


@dataclass
class _LocalScans:
    """Phase-1 state of one rank: local inclusive scans and the chunk summaries to exchange."""

    layout: ZigzagLayout
    ops: list[ScanOp]
    count_incl: torch.Tensor | None
    local_incl: list[torch.Tensor]
    summary: torch.Tensor  # [local chunks, n_cols] float64: (valid count), then one total per scan


def cp_segmented_scans(
    requests: Sequence[ScanRequest], valid: torch.Tensor, layout: ZigzagLayout, with_counts: bool = True
) -> list[ScanResult]:
    """Run several scans that share one validity mask with a single CP all_gather.

    ``with_counts=False`` skips the valid-element counts (a min scan detects an empty prefix as +inf).
    """
    local = _local_scans(requests, valid, layout, with_counts)
    if layout.cp_size == 1:
        gathered = [local.summary]
    else:
        gathered = [torch.empty_like(local.summary) for _ in range(layout.cp_size)]
        dist.all_gather(gathered, local.summary.contiguous(), group=layout.cp_group)
    return _finish_scans(local, gathered)


def simulate_cp_scans(
    requests_by_rank: Sequence[Sequence[ScanRequest]],
    valid_by_rank: Sequence[torch.Tensor],
    layouts: Sequence[ZigzagLayout],
    with_counts: bool = True,
) -> list[list[ScanResult]]:
    """All CP ranks of one group in a single process, exchanging summaries through lists instead of
    all_gather (same code path otherwise). For property tests and benchmarks."""
    locals_ = [_local_scans(r, v, l, with_counts) for r, v, l in zip(requests_by_rank, valid_by_rank, layouts)]
    gathered = [loc.summary for loc in locals_]
    return [_finish_scans(loc, gathered) for loc in locals_]


def _local_scans(
    requests: Sequence[ScanRequest], valid: torch.Tensor, layout: ZigzagLayout, with_counts: bool
) -> _LocalScans:
    n_local = layout.local_len
    if valid.shape != (n_local,):
        raise ValueError(f"cp scan: valid mask must have shape ({n_local},) for this layout, got {tuple(valid.shape)}")
    device = valid.device
    valid = valid.to(torch.bool) & _on(layout.local_valid, device)  # CP padding never counts
    seg = _on(layout.local_segment_ids, device)
    last = _on(layout.local_segment_last, device)
    columns = []
    count_incl = None
    if with_counts:
        count_incl = _segmented_int_cumsum(valid.to(torch.int64), _on(layout.local_segment_starts, device), seg)
        columns.append(count_incl[last].double())
    local_incl: list[torch.Tensor] = []
    for req in requests:
        if req.values.shape != (n_local,):
            raise ValueError(
                f"cp scan: values must have shape ({n_local},) for this layout, got {tuple(req.values.shape)}"
            )
        v = req.values.detach()
        v = torch.where(valid, v, torch.full((), NEUTRAL[req.op], dtype=v.dtype, device=device))
        offsets = _segment_offsets(layout, device) if req.op == "min" and v.dtype != torch.float64 else None
        incl = segmented_inclusive_scan(v, seg, req.op, offsets)
        local_incl.append(incl)
        columns.append(incl[last].double())
    # Exact in float64: counts < 2^53, float32 minima, float64 sums.
    summary = torch.stack(columns, dim=1) if columns else torch.zeros((last.numel(), 0), dtype=torch.float64)
    return _LocalScans(layout, [r.op for r in requests], count_incl, local_incl, summary)


def _finish_scans(local: _LocalScans, gathered: Sequence[torch.Tensor]) -> list[ScanResult]:
    layout = local.layout
    device = local.summary.device
    starts = _on(layout.local_segment_starts, device)
    with_counts = local.count_incl is not None
    ops: list[ScanOp] = (["sum"] if with_counts else []) + list(local.ops)
    per_chunk = _order_chunk_summaries(gathered, layout)  # [S, n_chunks, n_cols]
    S, n_chunks, n_cols = per_chunk.shape

    # Exclusive carry across chunks: a short loop over the 2*cp chunks of [S] tensors.
    carry = torch.empty_like(per_chunk)
    running = torch.tensor([NEUTRAL[o] for o in ops], dtype=torch.float64, device=device).expand(S, n_cols)
    for c in range(n_chunks):
        carry[:, c] = running
        running = torch.stack([combine(o, running[:, i], per_chunk[:, c, i]) for i, o in enumerate(ops)], dim=1)
    # With one chunk per sequence (cp == 1) every carry is neutral: skip the per-token gather.
    tok_carry = carry.reshape(S * n_chunks, n_cols)[_on(layout.local_carry_index, device)] if n_chunks > 1 else None

    excl_count = seq_count = None
    if with_counts:
        excl_count = _shift_exclusive(local.count_incl, starts, 0)
        if tok_carry is not None:
            excl_count = excl_count + tok_carry[:, 0].to(torch.int64)
        seq_count = running[:, 0].to(torch.int64)
    first = 1 if with_counts else 0
    results = []
    for i, (op, incl) in enumerate(zip(local.ops, local.local_incl)):
        exclusive = _shift_exclusive(incl, starts, NEUTRAL[op])
        if tok_carry is not None:
            exclusive = combine(op, tok_carry[:, first + i].to(incl.dtype), exclusive)
        results.append(
            ScanResult(
                exclusive=exclusive,
                seq_total=running[:, first + i].to(incl.dtype),
                exclusive_count=excl_count,
                seq_count=seq_count,
            )
        )
    return results


def cp_segmented_scan(
    values: torch.Tensor, valid: torch.Tensor, layout: ZigzagLayout, op: ScanOp, with_counts: bool = True
) -> ScanResult:
    return cp_segmented_scans([ScanRequest(values, op)], valid, layout, with_counts)[0]


def comm_bytes_per_call(layout: ZigzagLayout, n_scans: int, with_counts: bool = True) -> int:
    """Bytes this rank receives in the one all_gather of a call (for benchmarks and docs)."""
    if layout.cp_size == 1:
        return 0
    per_rank = layout.num_local_segments * (int(with_counts) + n_scans) * 8
    return per_rank * (layout.cp_size - 1)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _segment_offsets(layout: ZigzagLayout, device: torch.device) -> torch.Tensor:
    """-segment << 32 per local token (the min-scan key offsets), cached on the layout object."""
    cache = layout.__dict__.setdefault("_scan_cache", {})
    key = ("offsets", str(device))
    if key not in cache:
        cache[key] = -_on(layout.local_segment_ids, device).to(torch.int64) << 32
    return cache[key]


def _segmented_int_cumsum(x: torch.Tensor, starts: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Exact integer cumsum restarting at each segment (seg: dense ids 0, 0, 1, 1, 1, 2, ...)."""
    total = torch.cumsum(x, 0)
    before = (total - x)[starts]
    return total - before[seg]


def _shift_exclusive(incl: torch.Tensor, starts: torch.Tensor, neutral: float) -> torch.Tensor:
    out = torch.empty_like(incl)
    out[1:] = incl[:-1]
    return out.masked_fill_(starts, neutral)


def _order_chunk_summaries(gathered: Sequence[torch.Tensor], layout: ZigzagLayout) -> torch.Tensor:
    """Per-rank [n_local_seg, k] summaries -> [S, n_chunks, k] in chunk order within each sequence."""
    S = layout.num_seqs
    k = gathered[0].shape[1]
    if layout.cp_size == 1:
        return gathered[0].reshape(S, 1, k)
    if len(gathered) != layout.cp_size:
        raise ValueError(f"cp scan: expected summaries from {layout.cp_size} CP ranks, got {len(gathered)}")
    out = gathered[0].new_empty((S, layout.num_chunks, k))
    for rank, part in enumerate(gathered):
        first, second = layout.local_chunk_ids(rank)
        part = part.reshape(S, 2, k)  # local order: per sequence, first then second local chunk
        out[:, first] = part[:, 0]
        out[:, second] = part[:, 1]
    return out

"""Exact batch statistics over the ranks that hold disjoint tokens of one batch (DP x CP).

- ``all_reduce_`` helpers that are no-ops without a group (single-process references).
- ``global_kth_smallest``: the exact k-th smallest float32 over all ranks, by a radix search over the
  order-preserving integer image of float32 (2 all_reduces of 65536 counts; no O(T) gather).
- ``global_max_threshold``: the same search for monotone predicates on (sum, count) pairs, which gives
  M2PO's global masking threshold exactly.
- ``MetricBag``: sums/means, minima and maxima reduced with two all_reduces (minima as negated maxima).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from minpro_megatron.parallel.segmented import float32_ordered_bits

__all__ = [
    "all_reduce_sum",
    "all_reduce_min",
    "all_reduce_max",
    "global_kth_smallest",
    "largest_true",
    "MetricBag",
    "ordered_bits_to_float32",
]

_ARITY = 16


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective over ``group`` needs its tensors: NCCL-only groups take CUDA tensors, gloo
    (or a mixed cpu:gloo,cuda:nccl group) takes CPU tensors as they are."""
    backend = str(dist.get_backend(group))
    if "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dev = comm_device(group)
        if t.device.type == "cpu" and dev.type != "cpu":  # a CPU counter reduced over an NCCL group
            moved = t.to(dev)
            dist.all_reduce(moved, op=op, group=group)
            t.copy_(moved)
        else:
            dist.all_reduce(t, op=op, group=group)
    return t


def _stack_scalars(values: list) -> torch.Tensor:
    """float64 [n] from Python numbers and 0-d tensors, on the device of the first tensor among them."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM, group)


def all_reduce_min(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MIN, group)


def all_reduce_max(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def ordered_bits_to_float32(ordered: int) -> float:
    bits = ordered - (1 << 31)
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def largest_true(
    keys: torch.Tensor,
    weights: torch.Tensor | None,
    lo: int,
    hi: int,
    predicate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None,
) -> int:
    """Largest integer b in [lo, hi] with predicate(count(keys <= b), sum(weights[keys <= b])) True, where
    counts and sums are pooled over ``group``. The predicate must be monotone (True up to some b*, False
    after) and True at ``lo``.

    Each round splits (lo, hi] into 16 buckets, bins the local keys still inside it (``bucketize`` +
    ``bincount``), and all_reduces 15 (count, sum) pairs; keys outside the range are dropped, so the work
    shrinks with the range. A 32-bit range needs 8 rounds and about one pass over the data.
    """
    keys = keys.reshape(-1)
    w_all = weights.reshape(-1).double() if weights is not None else None
    inside = keys > lo
    # Global (count, sum) of the keys <= lo, which the search never revisits.
    dev = keys.device
    below_sum = w_all[~inside].sum() if w_all is not None else torch.zeros((), dtype=torch.float64, device=dev)
    base = all_reduce_sum(torch.stack([(~inside).sum().double(), below_sum]), group)
    keys = keys[inside]
    w = w_all[inside] if w_all is not None else None
    while hi > lo:
        span = hi - lo
        cands = torch.tensor(sorted({lo + max(1, math.ceil(span * j / (_ARITY - 1))) for j in range(1, _ARITY)}), device=dev)
        m = cands.numel()
        idx = torch.bucketize(keys, cands, right=False)  # j: cands[j-1] < key <= cands[j]
        counts = torch.bincount(idx, minlength=m + 1)[:m].double()
        sums = torch.bincount(idx, weights=w, minlength=m + 1)[:m] if w is not None else torch.zeros(m, dtype=torch.float64, device=dev)
        stats = all_reduce_sum(torch.stack([counts, sums], dim=1), group).cumsum(0) + base
        ok = predicate(stats[:, 0], stats[:, 1])
        trues = torch.nonzero(ok).flatten()
        if trues.numel() == 0:
            hi = int(cands[0]) - 1
        else:
            j = int(trues.max())
            lo = int(cands[j])
            base = stats[j].clone()
            if j + 1 < m:
                hi = int(cands[j + 1]) - 1
        keep = (keys > lo) & (keys <= hi)
        keys = keys[keep]
        w = w[keep] if w is not None else None
    return lo


def global_kth_smallest(
    values: torch.Tensor, k: int, group: dist.ProcessGroup | None, mask: torch.Tensor | None = None
) -> float:
    """Exact k-th smallest (1-based) of float32 ``values`` (where ``mask``) pooled over ``group``; NaN if
    k < 1. k must not exceed the pooled number of values."""
    if k < 1:
        return float("nan")
    v = values.detach().float().reshape(-1)
    if mask is not None:  # excluded values become +inf, above every k-th smallest we ask for
        v = torch.where(mask.reshape(-1), v, math.inf)
    if group is None or dist.get_world_size(group) == 1:
        return float(torch.kthvalue(v, k).values)
    return ordered_bits_to_float32(_radix_kth(float32_ordered_bits(v).reshape(-1), k, group))


_RADIX_BITS = 16  # 2 rounds over 32-bit keys: 2 all_reduces of 2**16 int64 counts (512 KiB each)


def _radix_kth(keys: torch.Tensor, k: int, group: dist.ProcessGroup | None) -> int:
    """The k-th smallest (1-based) of the non-negative 32-bit ``keys`` pooled over ``group``: per round, one
    all_reduce of the pooled histogram of the next 16 bits among keys that share the bits found so far.
    Integer counts, so the result does not depend on the split (same answer as ``largest_true``'s 16-ary
    search, which needs 9 all_reduces); each all_reduce is a synchronisation of the ranks."""
    prefix, rank = 0, k  # rank: position of the answer among the keys that match ``prefix``
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        digits = keys >> shift
        counts = torch.bincount(digits - (prefix << _RADIX_BITS), minlength=1 << _RADIX_BITS)
        counts = all_reduce_sum(counts.to(torch.int64), group)
        cum = counts.cumsum(0)
        d = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype, device=cum.device))[0])
        if d == cum.numel():
            raise ValueError(f"global_kth_smallest: k={k} exceeds the {int(cum[-1])} pooled values")
        rank -= int(cum[d - 1]) if d > 0 else 0
        prefix = (prefix << _RADIX_BITS) | d
        keys = keys[digits == prefix]
    return prefix


class MetricBag:
    """Collect per-rank partial metrics, then reduce them over a group in two all_reduces (sums; maxima
    with the minima negated, which is exact).

    mean(name, values): sum and count over the given (already masked) values -> global mean.
    frac(name, flags, denom_name): count of True / the global value stored under denom_name.
    total(name, value): a global sum. min/max(name, values): global extrema (NaN when empty), optionally
    mapped through a monotone ``transform`` afterwards. set(): a value that is already global.
    derived(name, fn): computed from the reduced metrics.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float | torch.Tensor] = {}
        self._mins: dict[str, torch.Tensor] = {}
        self._maxs: dict[str, torch.Tensor] = {}
        self._means: dict[str, float] = {}
        self._fracs: dict[str, str] = {}
        self._transforms: dict[str, Callable[[float], float]] = {}
        self._derived: dict[str, Callable[[dict[str, float]], float]] = {}
        self.values: dict[str, float] = {}

    def total(self, name: str, value: float | torch.Tensor) -> None:
        self._sums[name] = value

    def mean(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> None:
        v = values.detach()
        if mask is not None:  # masked sums instead of compaction: no nonzero/index pass over the tokens
            v = torch.where(mask, v, 0.0)
        # Native-dtype (pairwise) sums: a float64 accumulation would copy the whole tensor first.
        self._sums[f"{name}/_sum"] = v.sum().double()
        self._sums[f"{name}/_count"] = mask.sum().double() if mask is not None else float(v.numel())
        self._means[name] = scale

    def frac(self, name: str, flags: torch.Tensor, denom_name: str) -> None:
        self._sums[f"{name}/_num"] = flags.detach().sum(dtype=torch.float64)
        self._fracs[name] = denom_name

    def min(
        self,
        name: str,
        values: torch.Tensor,
        mask: torch.Tensor | None = None,
        transform: Callable[[float], float] | None = None,
    ) -> None:
        self._extremum(self._mins, name, values, mask, torch.amin, math.inf, transform)

    def max(
        self,
        name: str,
        values: torch.Tensor,
        mask: torch.Tensor | None = None,
        transform: Callable[[float], float] | None = None,
    ) -> None:
        self._extremum(self._maxs, name, values, mask, torch.amax, -math.inf, transform)

    def _extremum(self, store, name, values, mask, fn, empty, transform) -> None:
        v = values.detach()
        if mask is not None:
            v = torch.where(mask, v, empty)
        store[name] = fn(v).double() if v.numel() else torch.tensor(empty, dtype=torch.float64, device=v.device)
        self._sums[f"{name}/_n"] = mask.sum().double() if mask is not None else float(v.numel())
        if transform is not None:
            self._transforms[name] = transform

    def set(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def derived(self, name: str, fn: Callable[[dict[str, float]], float]) -> None:
        self._derived[name] = fn

    def alias(self, name: str, source: str) -> None:
        """Report metric ``source`` under a second name too."""
        self._derived[name] = lambda m: m[source]

    def reduce(self, group: dist.ProcessGroup | None) -> dict[str, float]:
        out = dict(self.values)
        counts: dict[str, float] = {}
        if self._sums:
            names = list(self._sums)
            t = _stack_scalars([self._sums[n] for n in names])
            sums = dict(zip(names, all_reduce_sum(t, group).tolist()))
            for n, scale in self._means.items():
                c = sums.pop(f"{n}/_count")
                s = sums.pop(f"{n}/_sum")
                out[n] = scale * s / c if c > 0 else math.nan
            for n, denom in self._fracs.items():
                num = sums.pop(f"{n}/_num")
                d = sums.get(denom, out.get(denom, 0.0))
                out[n] = num / d if d > 0 else 0.0
            counts = {n: sums.pop(f"{n}/_n") for n in [*self._mins, *self._maxs]}
            out.update(sums)
        if self._mins or self._maxs:  # min(x) = -max(-x) exactly: one all_reduce for both
            mins, maxs = list(self._mins), list(self._maxs)
            t = _stack_scalars([-self._mins[n] for n in mins] + [self._maxs[n] for n in maxs])
            t = all_reduce_max(t, group).tolist()
            for n, v in zip(mins + maxs, [-x for x in t[: len(mins)]] + t[len(mins):]):
                out[n] = self._transforms.get(n, float)(v) if counts[n] > 0 else math.nan
        for n, fn in self._derived.items():
            out[n] = fn(out)
        return out

"""The exact search behind global quantiles and M2PO's threshold, and the metric bag, against brute force.
(The multi-rank path runs in tests/losses/test_losses_distributed.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minpro_megatron.losses.token_losses import m2po_keep_mask
from minpro_megatron.parallel.reduce import MetricBag, global_kth_smallest, largest_true, ordered_bits_to_float32
from minpro_megatron.parallel.segmented import float32_ordered_bits

floats = st.floats(allow_nan=False, allow_infinity=True, width=32)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=200), q=st.floats(0.0, 1.0))
def test_search_kth_equals_sorted(values: list[float], q: float) -> None:
    v = torch.tensor(values, dtype=torch.float32)
    k = max(1, math.ceil(q * len(values)))
    b = largest_true(float32_ordered_bits(v), None, -1, (1 << 32) - 1, lambda c, s: c < k, None)
    assert ordered_bits_to_float32(b + 1) == sorted(v.tolist())[k - 1]
    assert global_kth_smallest(v, k, None) == sorted(v.tolist())[k - 1]


def test_kth_with_mask_ignores_excluded_values() -> None:
    v = torch.tensor([5.0, -1.0, 3.0, -7.0, 2.0])
    mask = torch.tensor([True, False, True, False, True])
    assert global_kth_smallest(v, 1, None, mask) == 2.0
    assert global_kth_smallest(v, 3, None, mask) == 5.0
    assert math.isnan(global_kth_smallest(v, 0, None, mask))


def brute_m2po(m2: list[float], tau: float) -> set[int]:
    best = 0.0
    for u in sorted(set(m2)):
        kept = [x for x in m2 if x <= u]
        if sum(kept) / len(kept) <= tau:
            best = u
    return {i for i, x in enumerate(m2) if x <= best}


@settings(max_examples=80, deadline=None)
@given(
    lr=st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32), min_size=1, max_size=120),
    tau=st.sampled_from([0.0001, 0.01, 0.04, 0.5, 10.0]),
    ties=st.booleans(),
)
def test_m2po_mask_equals_brute_force(lr: list[float], tau: float, ties: bool) -> None:
    x = torch.tensor(lr, dtype=torch.float32)
    if ties:  # many exactly equal M2 values: kept or dropped together
        x = torch.round(x * 2) / 2
    m2 = x.square()
    keep, _ = m2po_keep_mask(m2, torch.ones_like(m2, dtype=torch.bool), tau, None)
    want = brute_m2po(m2.double().tolist(), tau)
    assert set(torch.nonzero(keep).flatten().tolist()) == want


def test_metric_bag_reduces_masked_statistics_without_a_group() -> None:
    bag = MetricBag()
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([True, True, True, False])
    bag.total("n", m.sum())
    bag.mean("mean", x, m)
    bag.min("min", x, m, transform=lambda v: v * 10)
    bag.max("max", x, m)
    bag.frac("frac", x > 1.5, "n")
    bag.mean("empty", x, torch.zeros_like(m))
    bag.max("empty_max", x, torch.zeros_like(m))
    bag.derived("twice", lambda r: 2 * r["mean"])
    bag.alias("mean2", "mean")
    out = bag.reduce(None)
    assert out["mean"] == 2.0 and out["min"] == 10.0 and out["max"] == 3.0
    assert out["frac"] == pytest.approx(3 / 3)  # 2, 3 and the masked 100 count: frac takes flags as given
    assert math.isnan(out["empty"]) and math.isnan(out["empty_max"])
    assert out["twice"] == 4.0 and out["mean2"] == 2.0

"""Zigzag layout and CP segmented scans against plain per-sequence loops (all CP ranks simulated in one
process through ``simulate_cp_scans``; the real all_gather path is in test_losses_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.cp_scan import ScanRequest, comm_bytes_per_call, simulate_cp_scans
from minpro_megatron.parallel.segmented import segmented_inclusive_scan


def brute_exclusive(values: list[float], valid: list[bool], op: str) -> tuple[list[float], list[int]]:
    acc = {"min": math.inf, "sum": 0.0, "logaddexp": -math.inf}[op]
    out, counts, n = [], [], 0
    for v, ok in zip(values, valid):
        out.append(acc)
        counts.append(n)
        if ok:
            n += 1
            if op == "min":
                acc = min(acc, v)
            elif op == "sum":
                acc += v
            else:
                m = max(acc, v)
                acc = m + math.log(math.exp(acc - m) + math.exp(v - m)) if m > -math.inf else -math.inf
    return out, counts


def run_all_ranks(layout: ZigzagLayout, x: torch.Tensor, valid: torch.Tensor, ops: list[str]):
    layouts = [layout.for_rank(r) for r in range(layout.cp_size)]
    res = simulate_cp_scans(
        [[ScanRequest(l.split(x), op) for op in ops] for l in layouts], [l.split(valid) for l in layouts], layouts
    )
    merged = [layout.merge([r[i].exclusive.double() for r in res]) for i in range(len(ops))]
    counts = layout.merge([r[0].exclusive_count for r in res])
    return merged, counts, res


def check_against_brute(layout: ZigzagLayout, x: torch.Tensor, valid: torch.Tensor) -> None:
    ops = ["min", "sum", "logaddexp"]
    merged, counts, res = run_all_ranks(layout, x, valid, ops)
    for s in range(layout.num_seqs):
        a, n = int(layout.cu_seqlens_padded[s]), int(layout.seqlens[s])
        vals = x[a : a + n].double().tolist()
        ok = valid[a : a + n].tolist()
        for i, op in enumerate(ops):
            want, want_counts = brute_exclusive(vals, ok, op)
            got = merged[i][a : a + n]
            if op == "min":  # exact
                assert got.tolist() == [float(torch.tensor(w, dtype=x.dtype)) for w in want]
            else:
                torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)
            assert counts[a : a + n].tolist() == want_counts
            total = res[0][i].seq_total[s].item()
            full = brute_exclusive(vals + [0.0], ok + [False], op)[0][-1]
            assert total == pytest.approx(full, rel=1e-9, abs=1e-9) or (math.isinf(total) and total == full)
        assert int(res[0][0].seq_count[s]) == sum(ok)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=7),
    cp=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 10_000),
    p_valid=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    scale=st.sampled_from([1.0, 50.0]),
)
def test_scans_equal_brute_force_for_any_packing(lengths, cp, seed, p_valid, scale) -> None:
    layout = ZigzagLayout(torch.tensor(lengths), cp_size=cp)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(layout.total_padded, generator=g) * scale).float()
    valid = torch.rand(layout.total_padded, generator=g) < p_valid
    check_against_brute(layout, x, valid)


@pytest.mark.parametrize("cp", [2, 4])
def test_min_scan_bit_identical_across_cp_sizes(cp: int) -> None:
    lengths = torch.tensor([1, 3, 17, 64, 5, 2])
    g = torch.Generator().manual_seed(0)
    base = ZigzagLayout(lengths, cp_size=1)
    x = torch.randn(base.total_padded, generator=g)
    valid = torch.rand(base.total_padded, generator=g) > 0.2
    single, _, _ = run_all_ranks(base, x, valid, ["min"])
    layout = ZigzagLayout(lengths, cp_size=cp)
    xp, vp = layout.pad(base.unpad(x)), layout.pad(base.unpad(valid), False)
    multi, _, _ = run_all_ranks(layout, xp, vp, ["min"])
    assert torch.equal(base.unpad(single[0]), layout.unpad(multi[0]))


def test_chunk_boundary_inside_prompt_is_neutral() -> None:
    """A whole CP chunk of prompt tokens (mask False) passes the carry through unchanged."""
    layout = ZigzagLayout(torch.tensor([16]), cp_size=4)  # 8 chunks of 2 tokens
    x = torch.arange(16, dtype=torch.float32).neg()  # decreasing: the min is always the last valid token
    valid = torch.ones(16, dtype=torch.bool)
    valid[2:10] = False  # chunks 1..4 hold only prompt
    merged, counts, _ = run_all_ranks(layout, x, valid, ["min"])
    assert merged[0][10].item() == -1.0  # the last valid token before the prompt gap
    assert counts[10].item() == 2


def test_float64_min_scan_uses_exact_path() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.5, 4.0], dtype=torch.float64)
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    out = segmented_inclusive_scan(x, seg, "min")
    assert out.tolist() == [3.0, 1.0, 1.0, 5.0, 0.5, 0.5]
    f32 = segmented_inclusive_scan(x.float(), seg, "min")
    assert f32.tolist() == out.tolist()
    with pytest.raises(ValueError, match="NaN"):
        segmented_inclusive_scan(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]), "min")


def test_layout_split_merge_roundtrip_and_zigzag_order() -> None:
    layout = ZigzagLayout(torch.tensor([5, 1, 8]), cp_size=2)
    assert layout.padded_seqlens.tolist() == [8, 4, 8]
    x = torch.arange(layout.total_padded)
    parts = [layout.split_for_rank(x, r) for r in range(2)]
    # Rank 0 holds chunks 0 and 3 of every sequence, rank 1 chunks 1 and 2.
    assert parts[0].tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19]
    assert parts[1].tolist() == [2, 3, 4, 5, 9, 10, 14, 15, 16, 17]
    assert torch.equal(layout.merge(parts), x)
    assert layout.for_rank(1).local_valid.tolist() == [True, True, True, False, False, False, True, True, True, True]
    packed = torch.arange(14)
    assert torch.equal(layout.unpad(layout.pad(packed)), packed)


def test_layout_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"seqlens\[1\] = 0"):
        ZigzagLayout(torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="cp_rank=2"):
        ZigzagLayout(torch.tensor([3]), cp_size=2, cp_rank=2)
    layout = ZigzagLayout(torch.tensor([3, 4]), cp_size=2)
    with pytest.raises(ValueError, match="expected 2 local tensors"):
        layout.merge([torch.zeros(layout.local_len)])


def test_comm_bytes_are_independent_of_sequence_length() -> None:
    short = ZigzagLayout(torch.full((8,), 16), cp_size=4)
    long = ZigzagLayout(torch.full((8,), 16_384), cp_size=4)
    assert comm_bytes_per_call(short, 2) == comm_bytes_per_call(long, 2) == 8 * 2 * 3 * 8 * 3
    assert comm_bytes_per_call(ZigzagLayout(torch.full((8,), 16)), 2) == 0

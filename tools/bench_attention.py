"""Time of ZigzagCoreAttention on packed THD batches: the bucketed per-sequence path vs the dense
(local tokens x global tokens) mask path, side by side in one process.

    python tools/bench_attention.py                        # cp=1, the default model's heads (4 q / 2 kv, d=16)
    python tools/bench_attention.py --cp 2                 # two gloo ranks (zigzag chunks + all-gathered K/V)
    python tools/bench_attention.py --reps 20 --threads 2

Each row is one packing (sequences x tokens; "mixed" rows draw random lengths in [1, max], a quarter of
them length 1). For every repetition the two paths run back to back, alternating which goes first, on
the same inputs; the table gives the median forward time (no grad, as the rollout engine runs it) and
forward+backward time (q, k, v gradients) per path, the dense/bucketed ratios, and max |difference| of
the output and gradients between the paths. ``--cp 2`` reports rank 0's times (both ranks run the same
work in lock step; the all-gather is included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UNIFORM = [(256, 10), (64, 40), (16, 160), (4, 640)]
MIXED = [(128, 40), (32, 320)]  # (sequences, longest)
TINY = [(4, 5)]  # below DENSE_MAX_PAIRS: both columns run the dense path


def _lengths(case: tuple[str, int, int]) -> list[int]:
    import torch

    kind, n, length = case
    if kind == "uniform":
        return [length] * n
    g = torch.Generator().manual_seed(n * 1000 + length)
    lens = torch.randint(1, length + 1, (n,), generator=g)
    lens[torch.randperm(n, generator=g)[: n // 4]] = 1
    return lens.tolist()


def _measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    sys.path.insert(0, str(ROOT))
    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.logprobs import packed_seq_params
    from minpro_megatron.parallel.cp_attention import DENSE_MAX_PAIRS, ZigzagCoreAttention
    from minpro_megatron.parallel.cp_layout import ZigzagLayout

    torch.set_num_threads(args.threads)
    ctx = init_distributed(ParallelConfig(context=args.cp), seed=0)
    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    cfg = TransformerConfig(
        num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
        num_query_groups=args.groups, kv_channels=args.head_dim, attention_dropout=0.0, use_cpu_initialization=True,
    )
    attn = ZigzagCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
    cases = [("uniform", n, L) for n, L in UNIFORM] + [("mixed", n, L) for n, L in MIXED]
    cases += [("uniform", n, L) for n, L in TINY]
    rows = []
    for case in cases:
        layout = ZigzagLayout(torch.tensor(_lengths(case)), cp_size=cp, cp_rank=rank)
        psp = packed_seq_params(layout)
        g = torch.Generator().manual_seed(1)
        t = layout.local_len
        q = torch.randn(t, args.heads, args.head_dim, generator=g)
        k = torch.randn(t, args.groups, args.head_dim, generator=g)
        v = torch.randn(t, args.groups, args.head_dim, generator=g)
        grad = torch.randn(t, args.heads * args.head_dim, generator=g)

        def fwd(dense: bool):
            attn.dense_thd = dense
            with torch.no_grad():
                return attn(q, k, v, None, packed_seq_params=psp)

        def fwd_bwd(dense: bool):
            attn.dense_thd = dense
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = attn(*leaves, None, packed_seq_params=psp)
            out.backward(grad)
            return [out.detach()] + [x.grad for x in leaves]

        times: dict[tuple[str, bool], list[float]] = {(p, d): [] for p in ("fwd", "fwd+bwd") for d in (False, True)}
        for rep in range(args.reps + 1):  # the first repetition warms up (plans, masks, allocator)
            for dense in (rep % 2 == 0, rep % 2 == 1):
                for phase, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    t0 = time.perf_counter()
                    fn(dense)
                    if rep:
                        times[(phase, dense)].append(time.perf_counter() - t0)
        fast, dense = fwd_bwd(False), fwd_bwd(True)
        med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        name = f"{case[1]} x {case[2]}" if case[0] == "uniform" else f"{case[1]} x [1, {case[2]}]"
        rows.append(dict(
            case=name, tokens=layout.total_padded, dense_path=t * layout.total_padded <= DENSE_MAX_PAIRS,
            fwd_fast=med[("fwd", False)], fwd_dense=med[("fwd", True)],
            fb_fast=med[("fwd+bwd", False)], fb_dense=med[("fwd+bwd", True)],
            max_diff=max((a - b).abs().max().item() for a, b in zip(fast, dense)),
        ))
    destroy_distributed(ctx)
    return rows


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"ZigzagCoreAttention THD, cp={args.cp}, heads {args.heads} q / {args.groups} kv, head_dim {args.head_dim}, "
          f"float32, {args.threads} thread(s), median of {args.reps}")
    head = (f"{'sequences x tokens':>20} {'T':>6} | {'fwd bucketed':>12} {'fwd dense':>10} {'ratio':>7} | "
            f"{'f+b bucketed':>12} {'f+b dense':>10} {'ratio':>7} | {'max|diff|':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        note = "  (dense fallback)" if r["dense_path"] else ""
        print(f"{r['case']:>20} {r['tokens']:>6} | {r['fwd_fast']:>10.2f}ms {r['fwd_dense']:>8.2f}ms "
              f"{r['fwd_dense'] / r['fwd_fast']:>6.1f}x | {r['fb_fast']:>10.2f}ms {r['fb_dense']:>8.2f}ms "
              f"{r['fb_dense'] / r['fb_fast']:>6.1f}x | {r['max_diff']:>9.1e}{note}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (gloo ranks)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="KV heads (num_query_groups)")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.mp_utils import run_multiprocess

    results = run_multiprocess(_measure, args.cp, args, timeout=3600, threads=args.threads)
    _print(results[0], args)
    from bench_common import report

    for r in results[0]:
        ratio = r["fb_dense"] / r["fb_fast"]
        if r["dense_path"]:  # too few tokens to bucket: both sides run the dense mask, the ratio is noise
            report("bench_attention", f"cp={args.cp}, {r['case']}", f"dense fallback (no buckets): {ratio:.1f}x, max |diff| {r['max_diff']:.1e}", "", None)
            continue
        report("bench_attention", f"cp={args.cp}, {r['case']}", f"dense / bucketed fwd+bwd time {ratio:.1f}x, max |diff| {r['max_diff']:.1e}",
               ">= 1x (bucketed not slower)", ratio >= 1.0)


if __name__ == "__main__":
    main()

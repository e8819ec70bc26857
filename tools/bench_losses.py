#!/usr/bin/env python
"""Benchmark the policy-loss family: time and peak memory of forward+backward relative to CISPO, measured
side by side in one run at 8k, 32k and 128k tokens, plus the CP scan's bytes per call for cp in {2, 4}.

Peak memory is the high-water mark of torch's CPU allocator during one forward+backward, read from the
profiler's memory events (allocations minus frees), so it counts exactly the tensors the loss creates.

    python tools/bench_losses.py [--tokens 8192 32768 131072] [--repeats 20] [--png out.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import quiet_native_stderr, report
from minpro_megatron.losses import LossConfig, policy_loss
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.cp_scan import comm_bytes_per_call

VARIANTS: list[tuple[str, LossConfig]] = [
    ("cispo", LossConfig(name="cispo")),
    ("minpro (min, exclusive)", LossConfig(name="minpro")),
    ("minpro (mean)", LossConfig(name="minpro", prefix_stat="mean")),
    ("minpro (geomean)", LossConfig(name="minpro", prefix_stat="geomean")),
    ("minpro (prod)", LossConfig(name="minpro", prefix_stat="prod")),
    ("grpo", LossConfig(name="grpo")),
    ("gspo", LossConfig(name="gspo")),
    ("m2po", LossConfig(name="m2po")),
]


@dataclass
class Batch:
    layout: ZigzagLayout
    logp: torch.Tensor
    old_logp: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor


def make_batch(total_tokens: int, seed: int = 0) -> Batch:
    """Sequences of 256-2048 tokens (20% prompt) until the budget is used; float32 like the learner."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total_tokens:
        lengths.append(min(int(torch.randint(256, 2049, (1,), generator=g)), total_tokens - sum(lengths)))
    layout = ZigzagLayout(torch.tensor(lengths))
    n = layout.local_len
    logp = -torch.rand(n, generator=g) * 4
    old = logp + 0.3 * torch.randn(n, generator=g)
    adv = torch.randn(len(lengths), generator=g)[layout.local_seq_ids]
    mask = layout.local_positions >= (layout.seqlens[layout.local_seq_ids] // 5)
    return Batch(layout, logp, old, adv, mask)


def run_once(batch: Batch, cfg: LossConfig) -> None:
    logp = batch.logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, batch.old_logp, batch.adv, batch.mask, batch.layout, cfg)
    loss.backward()


def interleaved_ms(batch: Batch, cfgs: list[LossConfig], repeats: int) -> list[float]:
    """Median ms of each config, timed round-robin (one call of each per round) so that the load of a
    shared host falls on every config alike and the ratios stay side by side."""
    for cfg in cfgs:
        run_once(batch, cfg)  # warm-up
    samples: list[list[float]] = [[] for _ in cfgs]
    for _ in range(repeats):
        for i, cfg in enumerate(cfgs):
            t0 = time.perf_counter()
            run_once(batch, cfg)
            samples[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(s) for s in samples]


def peak_bytes(batch: Batch, cfg: LossConfig) -> int:
    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(batch, cfg)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default=None, help="also write a plot of time and memory ratios")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for tokens in args.tokens:
        batch = make_batch(tokens)
        configs = [(label, diag, LossConfig(**{**vars(cfg), "prefix_diagnostics": diag})) for label, cfg in VARIANTS for diag in (True, False)]
        times = interleaved_ms(batch, [c for _, _, c in configs], args.repeats)
        for (label, diag, c), t in zip(configs, times):
            rows.append((tokens, label, diag, t, peak_bytes(batch, c)))
        # Ratios against cispo with the same diagnostics setting.
        base = {d: next(r for r in rows if r[0] == tokens and r[1] == "cispo" and r[2] == d) for d in (True, False)}
        for i, r in enumerate(rows):
            if r[0] == tokens and len(r) == 5:
                b = base[r[2]]
                rows[i] = (*r, r[3] / b[3], r[4] / b[4])

    print("\n## Policy losses: forward + backward, float32, 1 thread (ratios vs cispo with the same diagnostics)\n")
    print("| tokens | loss | prefix diagnostics | time ms | x cispo | peak MiB | x cispo | bytes/token |")
    print("|---:|---|:---:|---:|---:|---:|---:|---:|")
    for tokens, label, diag, t, m, rt, rm in rows:
        print(f"| {tokens} | {label} | {'on' if diag else 'off'} | {t:.2f} | {rt:.2f} | {m / 2**20:.1f} | {rm:.2f} | {m / tokens:.0f} |")

    print()
    for tokens, label, diag, t, m, rt, rm in rows:
        if label == "minpro (min, exclusive)":
            setting = f"{tokens // 1024}k tokens, diagnostics {'on (default)' if diag else 'off'}"
            met = rt <= 1.05 if diag else None  # with diagnostics off CISPO runs no scan: context, no target
            report("bench_losses", setting, f"minpro / cispo time {rt:.2f}x, memory {rm:.2f}x ({m / tokens:.0f} B/token)",
                   "<= 1.05x time" if diag else "", met)

    print("\n## CP scan communication per loss call (one all_gather of chunk summaries), this rank's receive bytes\n")
    print("| tokens | sequences | cp | minpro scan bytes | all-gather of log-probs bytes | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        b = make_batch(tokens)
        for cp in (2, 4):
            layout = ZigzagLayout(b.layout.seqlens, cp_size=cp)
            scan = comm_bytes_per_call(layout, n_scans=1, with_counts=False)  # minpro (min): one float64 per chunk
            naive = layout.local_len * 4 * (cp - 1)
            print(f"| {tokens} | {layout.num_seqs} | {cp} | {scan} | {naive} | {scan / naive:.4f} |")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, _ in VARIANTS:
            sel = [r for r in rows if r[1] == label and r[2]]
            axes[0].plot([r[0] for r in sel], [r[5] for r in sel], marker="o", label=label)
            axes[1].plot([r[0] for r in sel], [r[6] for r in sel], marker="o", label=label)
        for ax, title in zip(axes, ("time / cispo", "peak memory / cispo")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_title(title)
            ax.axhline(1.0, color="grey", lw=0.5)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()

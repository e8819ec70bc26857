#!/usr/bin/env python
"""Step time with staleness 0 vs staleness 2 (or vs in-flight weight updates) on the embedded default, in one run.

With exact delay n >= 1 the batch of step s + n is generated (on the SGLang fleet, by rank 0's async
client) while the learner trains step s, so a step costs about max(rollout, train) + sync instead of
rollout + train + sync. The local engine shares the learner's model and process, so it cannot overlap:
it is measured as the reference. Each configuration runs as its own trainer process; the table reports
the mean over steps after the first two (start-up and the initial n + 1 batches excluded).

    python tools/bench_staleness_overlap.py [--steps 8] [--backends sglang local] [--png overlap.png]

``--mode inflight``: SGLang only, staleness 0 vs in-flight weight updates (rollout.partial: bounded age 1,
servers paused in 'retract' mode, so the run-ahead generation continues across the weight sync and is
collected at the next step), against the ideal max(train, generate) taken from the staleness-0 run, where
the two are measured one after the other.

    python tools/bench_staleness_overlap.py --mode inflight [--steps 8]

``--mode all`` (what ``make bench`` runs): SGLang only, both comparisons from one staleness-0 run (three
trainer runs instead of four).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "tiny_moe_cpu.yaml"


PARTIAL = ["rollout.partial=true", "rollout.pause_mode=retract", "rollout.staleness.mode=bounded"]  # + n=1


def run(backend: str, n: int, steps: int, out: Path, extra: list[str] = ()) -> dict[str, float]:
    overrides = [f"train.steps={steps}", "train.warm_start_steps=20", f"rollout.staleness.n={n}",
                 f"rollout.backend={backend}", f"logging.output_dir={out}", "data.num_eval=32",
                 "checkpoint.save_interval=0", *extra]  # no checkpoints: no step time includes one, and the final save (seconds on CPU) is skipped
    if backend == "sglang":
        overrides += ["rollout.num_servers=1", "rollout.base_port=0", "rollout.router_port=0"]
    cmd = [sys.executable, "-m", "minpro_megatron.cli", "train", str(CONFIG), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise RuntimeError(f"{backend} n={n} {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "tb" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r and r["step"] > 2]
    keys = ["time/step_s", "time/rollout_s", "time/rollout_wait_s", "time/train_s", "time/sync_s", "time/probe_wait_s"]
    return {k: statistics.fmean(float(r.get(k, 0.0)) for r in rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backends", nargs="+", default=["sglang", "local"])
    ap.add_argument("--png", default=None)
    ap.add_argument("--mode", choices=["overlap", "inflight", "all"], default="overlap")
    args = ap.parse_args()
    if args.mode == "inflight":
        return inflight(args.steps)
    backends = ["sglang"] if args.mode == "all" else args.backends
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for n in (0, 2):
                results[(backend, n)] = run(backend, n, args.steps, Path(tmp) / f"{backend}-n{n}")
        if args.mode == "all":
            inflight(args.steps, base=results[("sglang", 0)])
    print("\n## Step time, staleness 0 vs 2 (embedded default; mean of steps 3..N; seconds)\n")
    print("| backend | n | step | rollout | waited for rollout | train | sync | step / step(n=0) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (backend, n), r in results.items():
        base = results[(backend, 0)]["time/step_s"]
        print(f"| {backend} | {n} | {r['time/step_s']:.3f} | {r['time/rollout_s']:.3f} | {r['time/rollout_wait_s']:.3f} | "
              f"{r['time/train_s']:.3f} | {r['time/sync_s']:.3f} | {r['time/step_s'] / base:.2f} |")
    sys.path.insert(0, str(REPO / "tools"))
    from bench_common import report

    for backend in backends:
        ratio = results[(backend, 2)]["time/step_s"] / results[(backend, 0)]["time/step_s"]
        overlap = backend == "sglang"  # the local engine shares the learner's process: reference only
        report("bench_staleness_overlap", f"{backend}, staleness 2 vs 0, {args.steps} steps",
               f"step time {ratio:.2f}x ({results[(backend, 2)]['time/step_s']:.3f} s vs {results[(backend, 0)]['time/step_s']:.3f} s)",
               "<= 0.9x" if overlap else "", ratio <= 0.9 if overlap else None)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{b}\nn={n}" for b, n in results]
        parts = ["time/rollout_wait_s", "time/train_s", "time/sync_s"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bottom = [0.0] * len(labels)
        for part in parts:
            vals = [r[part] for r in results.values()]
            ax.bar(labels, vals, bottom=bottom, label=part.split("/")[1])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("seconds per step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"\nplot: {args.png}")


def inflight(steps: int, base: dict[str, float] | None = None) -> None:
    """Staleness 0 (``base`` if already measured in this run) vs in-flight weight updates (rollout.partial) vs
    the ideal max(train, generate)."""
    with tempfile.TemporaryDirectory() as tmp:
        if base is None:
            base = run("sglang", 0, steps, Path(tmp) / "n0")
        part = run("sglang", 1, steps, Path(tmp) / "partial", PARTIAL)
    ideal = max(base["time/train_s"], base["time/rollout_s"])
    print(f"\n## Step time, staleness 0 vs in-flight weight updates (embedded default, sglang; mean of steps 3..{steps}; seconds)\n")
    # probe: waiting for the last sync's background probe (rollout.partial) before the update
    print("| run | step | rollout | waited for rollout | train | sync | waited for probe | step / step(n=0) | step / ideal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("staleness 0", base), ("in-flight (partial, bounded n=1)", part)):
        print(f"| {name} | {r['time/step_s']:.3f} | {r['time/rollout_s']:.3f} | {r['time/rollout_wait_s']:.3f} | "
              f"{r['time/train_s']:.3f} | {r['time/sync_s']:.3f} | {r['time/probe_wait_s']:.3f} | "
              f"{r['time/step_s'] / base['time/step_s']:.2f} | {r['time/step_s'] / ideal:.2f} |")
    print(f"| ideal max(train, generate) of the staleness-0 run | {ideal:.3f} | | | | | | {ideal / base['time/step_s']:.2f} | 1.00 |")
    sys.path.insert(0, str(REPO / "tools"))
    from bench_common import report

    ratio = part["time/step_s"] / base["time/step_s"]
    report("bench_staleness_overlap", f"sglang, in-flight updates vs staleness 0, {steps} steps",
           f"step time {ratio:.2f}x ({part['time/step_s']:.3f} s vs {base['time/step_s']:.3f} s); "
           f"{part['time/step_s'] / ideal:.2f}x the ideal max(train, generate) = {ideal:.3f} s", "<= 0.9x", ratio <= 0.9)


if __name__ == "__main__":
    main()

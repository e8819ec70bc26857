#!/usr/bin/env python
"""Run every benchmark in tools/ once (sizes chosen to finish in about 10 minutes on a 2-core CPU host) and
write ONE markdown table of their results (``make bench``; default docs/benchmarks.md).

Each benchmark prints ``BENCH_RESULT {json}`` lines (tools/bench_common.py): what was measured side by
side in its run, its target and whether it was met. A benchmark that fails gets a FAILED row with the
end of its output, and the others still run. The header names the date, the machine and the load
average, because on a shared host the load biases absolute numbers (the ratios are measured side by side).

    python tools/run_benchmarks.py [--out docs/benchmarks.md] [--only bench_rollout,bench_losses]

With --only, the other benchmarks' rows and commands already in --out are kept, and the header says
which benchmarks were rerun when.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from bench_common import RESULT_PREFIX  # noqa: E402

# (script, arguments): reduced sizes so the whole set stays within ~10 minutes on a 2-core host; the scripts'
# defaults are larger. Each slow benchmark keeps what its ratio needs: weight sync one small bf16 model and
# one >= 512 MiB fp32 model (the target row) with a bucketed and a one-bucket transfer, 2 repetitions for
# a spread; rollout 32 prompts x 32 new tokens (the ratio is per repetition, against SGLang's client on
# the same requests); staleness 5 steps (steps 3-5 are the steady state that is averaged).
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("bench_losses", ["--tokens", "8192", "32768", "131072", "--repeats", "15"]),
    ("bench_logprobs", ["--tokens", "4096", "--vocab", "32768"]),
    ("bench_attention", ["--reps", "3"]),
    ("bench_convert", ["--layers", "2"]),
    ("bench_learner_overhead", ["--rounds", "5"]),
    ("bench_memory_estimate", []),
    ("bench_weight_sync", ["--models", "27:bfloat16,512:float32", "--bucket-mb", "31,64", "--reps", "2"]),
    ("bench_rollout", ["--prompts", "32", "--output-len", "32", "--reps", "2"]),
    ("bench_staleness_overlap", ["--steps", "5", "--mode", "all"]),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def versions() -> str:
    import importlib.metadata as md

    out = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "megatron-core", "sglang"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


BUDGET_MIN = 10  # make bench's wall-time target (minutes)


def run_one(name: str, argv: list[str]) -> tuple[list[dict], float, str]:
    cmd = [sys.executable, str(TOOLS / f"{name}.py"), *argv]
    print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows, tail = [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            rows.append(json.loads(line[len(RESULT_PREFIX):]))
            continue
        sys.stdout.write(line)
        tail = (tail + [line.rstrip()])[-5:]
    rc = proc.wait()
    seconds = time.perf_counter() - t
    if rc != 0 or not rows:
        why = f"exit code {rc}" if rc else "printed no result"
        rows.append(dict(bench=name, setting="", measured=f"FAILED ({why}): {' / '.join(tail)[-300:]}", target="", met=False, note=""))
    return rows, seconds, " ".join(cmd[1:]).replace(str(REPO) + "/", "")


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--only", default="", help="comma list of benchmark names (default: all)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    unknown = only - {n for n, _ in BENCHMARKS}
    if unknown:
        sys.exit(f"--only: unknown benchmark(s) {sorted(unknown)}; choose from {[n for n, _ in BENCHMARKS]}")
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    results, runs = [], []
    for name, argv in BENCHMARKS:
        if only and name not in only:
            continue
        rows, seconds, cmd = run_one(name, argv)
        results += rows
        runs.append((name, cmd, seconds))
    total = time.perf_counter() - t0
    load1 = os.getloadavg()

    status = {True: "met", False: "**missed**", None: "-"}
    if not only:  # the whole suite's wall time is itself a target: make bench must stay cheap enough to run
        results.append(dict(bench="make bench", setting="all benchmarks, one run", measured=f"{total / 60:.1f} min",
                            target=f"<= {BUDGET_MIN} min", met=total / 60 <= BUDGET_MIN, note=""))
    rows = []
    for r in results:
        measured = r["measured"] + (f" ({r['note']})" if r.get("note") else "")
        rows.append(f"| `{r['bench']}` | {cell(r['setting'])} | {cell(measured)} | {cell(r['target'] or '-')} | {status[r['met']]} |")
    runs_md = [f"- `{cmd}`: {seconds:.0f} s" for _, cmd, seconds in runs]
    header = [
        f"Generated by `make bench` (`tools/run_benchmarks.py`) on {started:%Y-%m-%d %H:%M} UTC in {total / 60:.1f} min.",
        f"Machine: {machine()}; {versions()}.",
        f"Load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end: other work shares this host, so "
        "absolute times carry its load; every ratio below is measured side by side in one run.",
    ]
    if only and Path(args.out).is_file():  # keep what the other benchmarks wrote last time, in their order
        old = Path(args.out).read_text().splitlines()
        names = [n for n, _ in BENCHMARKS]
        old_rows = [ln for ln in old if ln.startswith("| `")]
        by_name = {n: [ln for ln in old_rows if ln.split("`")[1] == n] for n in names}
        by_name.update({n: [ln for ln in rows if ln.split("`")[1] == n] for n in only})
        rows = [ln for n in names for ln in by_name[n]]
        old_runs = [ln for ln in old if ln.startswith("- `tools/")]
        runs_md = [ln for ln in old_runs if Path(ln.split("`")[1].split()[0]).stem not in only] + runs_md
        kept = [ln for ln in old if ln.startswith(("Generated by", "Machine:", "Load average", "Rerun "))]
        header = kept + [f"Rerun {', '.join(sorted(only))} on {started:%Y-%m-%d %H:%M} UTC in {total / 60:.1f} min "
                         f"(load average {load0[0]:.1f} -> {load1[0]:.1f})."]
    lines = ["# Benchmarks", "", *header, "", "| benchmark | setting | measured | target | status |", "|---|---|---|---|---|",
             *rows, "", "Commands and wall times:", "", *runs_md]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("\n" + text)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

"""Staleness sweeps: methods x staleness x seeds, run locally (one after another) or as a Slurm job array,
and the collector that turns the runs' TensorBoard scalars into a table (Markdown + CSV) and PNG plots.

    minpro-sweep run CONFIG [overrides...] --methods grpo,cispo,minpro --staleness 0,2 --seeds 1,2 --out DIR
    minpro-sweep run CONFIG ... --slurm [--dry-run]      # the same grid as a job array (minpro-slurm sweep)
    minpro-sweep collect DIR/runs [--out DIR]            # also what the Slurm collector job runs

Each run lives in DIR/runs/<name> (the trainer's output dir); a run whose summary.md exists is skipped,
so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import yaml

from minpro_megatron.config_base import UserError
from minpro_megatron.logging.report import plot_runs, read_scalars, write_csv, write_markdown_table

__all__ = ["main", "collect", "run_local", "SWEEP_PLOT_TAGS"]

SWEEP_PLOT_TAGS = ["rollout/reward_mean", "loss/entropy", "loss/clip_frac_high", "loss/rho_min_mean"]
TABLE_TAGS = {
    "reward": "rollout/reward_mean",
    "eval_acc": "eval/accuracy",
    "entropy": "loss/entropy",
    "clip_high": "loss/clip_frac_high",
    "rho_min": "loss/rho_min_mean",
    "rho_min_p10": "loss/rho_min_p10",
    "kl_k3": "loss/kl_k3",
}


def _last(points: Sequence[tuple[int, float]], k: int = 5) -> float:
    vals = [v for _, v in points[-k:] if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _run_info(run_dir: Path) -> dict | None:
    if not (run_dir / "config.yaml").is_file() and (run_dir / "output").is_dir():
        run_dir = run_dir / "output"  # a Slurm array task: RUN_DIR/output is the trainer's output dir
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file() or not (run_dir / "tb").is_dir():
        return None
    cfg = yaml.safe_load(cfg_file.read_text())
    return {
        "method": cfg["loss"]["name"] + ("" if cfg["loss"].get("prefix_stat", "min") == "min" or cfg["loss"]["name"] != "minpro"
                                         else f"-{cfg['loss']['prefix_stat']}"),
        "staleness": int(cfg["rollout"]["staleness"]["n"]),
        "seed": int(cfg["train"]["seed"]),
        "scalars": read_scalars(run_dir / "tb"),
    }


def collect(runs_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Table (mean +- std over seeds of the last 5 logged points) and one PNG per metric."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir} is not a directory: pass the runs/ folder of a sweep (minpro-sweep collect DIR/runs)")
    out = Path(out_dir) if out_dir else runs_dir.parent
    out.mkdir(parents=True, exist_ok=True)
    infos = [i for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if (i := _run_info(d))]
    if not infos:
        raise UserError(f"no finished runs (config.yaml + tb/) under {runs_dir}")
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for info in infos:
        cells[(info["method"], info["staleness"])].append(info)
    rows = []
    for (method, n), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, object] = {"method": method, "staleness": n, "seeds": len(runs)}
        for col, tag in TABLE_TAGS.items():
            vals = [_last(r["scalars"].get(tag, [])) for r in runs]
            vals = [v for v in vals if not math.isnan(v)]
            row[col] = statistics.fmean(vals) if vals else math.nan
            row[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        peak = [max((v for _, v in r["scalars"].get("rollout/reward_mean", [])), default=math.nan) for r in runs]
        row["reward_peak"] = statistics.fmean(peak) if peak else math.nan
        rows.append(row)
    table = out / "sweep_table.md"
    write_markdown_table(rows, table, title=f"Staleness sweep ({len(infos)} runs; last-5-point means over seeds)")
    write_csv(rows, out / "sweep_table.csv")
    plots = []
    for tag in SWEEP_PLOT_TAGS:
        by_n: dict[int, dict[str, dict]] = defaultdict(dict)
        for (method, n), runs in cells.items():
            by_n[n][method] = _seed_mean(r["scalars"].get(tag, []) for r in runs)
        path = out / f"sweep_{tag.replace('/', '_')}.png"
        plot_runs({f"{m} n={n}": {tag: pts} for n, methods in sorted(by_n.items()) for m, pts in sorted(methods.items())},
                  [tag], path, title=f"{tag} by method and staleness n", smooth=3)
        plots.append(path)
    return table, plots


def _seed_mean(series) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for pts in series:
        for s, v in pts:
            by_step[s].append(v)
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def run_local(config: str, overrides: list[str], grid: dict[str, list[str]], out: Path) -> list[Path]:
    """Run every grid point in turn (subprocesses of the trainer CLI); skip finished ones."""
    from rich.progress import Progress

    from minpro_megatron.slurm.submit import sweep_tasks

    tasks = sweep_tasks(config, overrides, grid)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    done = []
    with Progress() as progress:
        bar = progress.add_task(f"sweep ({len(tasks)} runs)", total=len(tasks))
        for task in tasks:
            run_dir = runs / task.name
            if not (run_dir / "summary.md").is_file():
                cmd = [sys.executable, "-m", "minpro_megatron.cli", "train", config, *overrides, *task.overrides,
                       f"logging.output_dir={run_dir}"]
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "train.log", "w") as log:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
                if rc:
                    raise UserError(f"sweep run {task.name} failed (exit {rc}); see {run_dir / 'train.log'}")
            done.append(run_dir)
            progress.advance(bar)
    return done


def _grid(args: argparse.Namespace) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    if args.methods:
        grid["loss.name"] = args.methods.split(",")
    if args.staleness:
        grid["rollout.staleness.n"] = args.staleness.split(",")
    if args.seeds:
        grid["train.seed"] = args.seeds.split(",")
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "collect", "-h", "--help"):
        close = difflib.get_close_matches(argv[0], ["run", "collect"], n=1)
        raise UserError(f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
                        + "; use minpro-sweep run CONFIG ... or minpro-sweep collect DIR/runs")
    if not argv or argv[0] not in ("run", "collect"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from minpro_megatron.cli_support import Parser

    cmd, rest = argv[0], argv[1:]
    if cmd == "collect":
        p = Parser(prog="minpro-sweep collect")
        p.add_argument("runs_dir")
        p.add_argument("--out")
        a = p.parse_args(rest)
        table, plots = collect(a.runs_dir, a.out)
        print(table.read_text())
        print("plots:", *plots, sep="\n  ")
        return 0
    p = Parser(prog="minpro-sweep run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--methods", default="grpo,minpro")
    p.add_argument("--staleness", default="0,2")
    p.add_argument("--seeds", default="1")
    p.add_argument("--out", type=Path, default=Path("outputs/sweep"))
    p.add_argument("--slurm", action="store_true", help="submit as a Slurm job array (minpro-slurm sweep)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the job files only")
    a = p.parse_args(rest)
    if a.slurm:
        from minpro_megatron.slurm.submit import main as slurm_main

        extra = ["--methods", a.methods, "--staleness", a.staleness, "--seeds", a.seeds, "--run-dir", str(a.out)]
        return slurm_main(["sweep", a.config, *a.overrides, *extra, *(["--dry-run"] if a.dry_run else [])])
    from minpro_megatron.config import load_config
    from minpro_megatron.preflight import check_run_inputs

    check_run_inputs(load_config(a.config, a.overrides))  # before any run folder is made
    run_local(a.config, a.overrides, _grid(a), a.out)
    table, plots = collect(a.out / "runs", a.out)
    print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

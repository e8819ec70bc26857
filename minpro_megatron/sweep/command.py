"""Staleness sweeps: methods x staleness x seeds, run locally (one after another) or as a Slurm job array,
and the collector that turns the runs' TensorBoard scalars into a table (Markdown + CSV) and PNG plots.

    minpro-sweep run CONFIG [overrides...] --methods grpo,cispo,minpro --staleness 0,2 --seeds 1,2 --out DIR
    minpro-sweep run CONFIG ... --slurm [--dry-run]      # the same grid as a job array (minpro-slurm sweep)
    minpro-sweep collect DIR/runs [--out DIR]            # also what the Slurm collector job runs

    minpro-sweep run CONFIG [overrides...] --grid GRID.yaml --out DIR [--checkpoint-root CKPT] [--keep-going]

Each run lives in DIR/runs/<name> (the trainer's output dir) with its own checkpoint directory. A cell is
finished when DIR/runs/<name>/cell_done.json exists (written atomically after the trainer succeeded);
a second call skips finished cells and restarts interrupted ones, so a killed sweep continues where it
stopped.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.config.base import UserError
from minpro_megatron.sweep.grid import (
    CELL_FILE, DONE_MARKER, FAILED_MARKER, Cell, cell_checkpoint_dir, is_done, load_grid, select_cells,
    validate_cells, write_json_atomic,
)
from minpro_megatron.sweep.report import RESULTS_BEGIN, RESULTS_END, collect, update_doc

def run_local(config: str, overrides: list[str], cells: Sequence[Cell], out: Path,
              checkpoint_root: Path | None = None, keep_going: bool = False) -> list[Path]:
    """Run the cells in order (subprocesses of the trainer CLI). A cell counts as finished only when its
    completion marker exists (written atomically after the trainer exited 0 and wrote summary.md); a cell
    without one was interrupted or failed and restarts from scratch (its run and checkpoint directories
    are cleared), so every metric row of a cell comes from one uninterrupted process. ``keep_going``:
    record a failed cell (cell_failed.json) and continue; it is retried on the next call."""
    from rich.progress import Progress

    validate_cells(config, overrides, cells)
    runs = out / "runs"
    _check_finished_cells(config, overrides, cells, runs, checkpoint_root)
    runs.mkdir(parents=True, exist_ok=True)
    done, failed = [], []
    with Progress() as progress:
        bar = progress.add_task(f"sweep ({len(cells)} runs)", total=len(cells))
        for cell in cells:
            run_dir = runs / cell.name
            if not is_done(run_dir):
                ckpt = cell_checkpoint_dir(config, overrides, cell, checkpoint_root)
                for d in (run_dir, ckpt):  # an interrupted attempt: start the cell over
                    if d is not None and d.exists():
                        shutil.rmtree(d)
                run_dir.mkdir(parents=True)
                extra = _run_overrides(run_dir, ckpt)
                cmd = [sys.executable, "-m", "minpro_megatron.cli", "train", config, *overrides, *cell.overrides, *extra]
                info = {"name": cell.name, "group": cell.group, "method": cell.method, "overrides": list(cell.overrides),
                        "command": cmd[1:], "checkpoint_dir": str(ckpt) if ckpt else None}
                write_json_atomic(run_dir / CELL_FILE, info)
                t0, load0 = time.time(), os.getloadavg()
                with open(run_dir / "train.log", "w") as log:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
                record = {"name": cell.name, "exit_code": rc, "wall_s": round(time.time() - t0, 1),
                          "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                          "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()}
                if rc or not (run_dir / "summary.md").is_file():
                    write_json_atomic(run_dir / FAILED_MARKER, record)
                    if not keep_going:
                        raise UserError(f"sweep run {cell.name} failed (exit {rc}); see {run_dir / 'train.log'}")
                    failed.append(cell.name)
                    progress.advance(bar)
                    continue
                write_json_atomic(run_dir / DONE_MARKER, record)
            done.append(run_dir)
            progress.advance(bar)
    if failed:
        print(f"sweep: {len(failed)} cell(s) failed and will be retried on the next call: {', '.join(failed)}", file=sys.stderr)
    return done


def _run_overrides(run_dir: Path, ckpt: Path | None) -> list[str]:
    return [f"logging.output_dir={run_dir}"] + ([f"checkpoint.dir={ckpt}"] if ckpt is not None else [])


def _check_finished_cells(config: str, overrides: list[str], cells: Sequence[Cell], runs: Path,
                          checkpoint_root: Path | None) -> None:
    """A finished cell is skipped only if it was made with the config it would run with now (sweep/protocol.py):
    a changed protocol never counts an old result as a new one."""
    from minpro_megatron.config import to_dict
    from minpro_megatron.sweep.protocol import check_done_cells

    done = []
    for cell in cells:
        run_dir = runs / cell.name
        if is_done(run_dir):
            ckpt = cell_checkpoint_dir(config, overrides, cell, checkpoint_root)
            now = load_config(config, [*overrides, *cell.overrides, *_run_overrides(run_dir, ckpt)])
            done.append((cell.name, run_dir, to_dict(now)))
    if done:
        check_done_cells(done)


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
        p.add_argument("--grid", help="the sweep's grid file: list the cells still pending")
        p.add_argument("--doc", help="a Markdown file whose results block (between the markers "
                                     f"{RESULTS_BEGIN} and {RESULTS_END}) is replaced by the table and plots")
        a = p.parse_args(rest)
        table, plots = collect(a.runs_dir, a.out, load_grid(a.grid) if a.grid else None)
        if a.doc:
            update_doc(Path(a.doc), table, plots)
        print(table.read_text())
        print("plots:", *plots, sep="\n  ")
        return 0
    p = Parser(prog="minpro-sweep run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--grid", help="a grid file (examples/study/grid.yaml); replaces --methods/--staleness/--seeds")
    p.add_argument("--methods", default=None, help="default grpo,minpro")
    p.add_argument("--staleness", default=None, help="default 0,2")
    p.add_argument("--seeds", default=None, help="default 1")
    p.add_argument("--out", type=Path, default=Path("outputs/sweep"))
    p.add_argument("--checkpoint-root", type=Path, default=None,
                   help="checkpoints of cell NAME go to CHECKPOINT_ROOT/NAME (default: the base checkpoint.dir/NAME "
                        "if set, else the run dir's checkpoints/)")
    p.add_argument("--keep-going", action="store_true", help="record a failed cell and continue with the next")
    p.add_argument("--only", default=None,
                   help="comma-separated cell names or fnmatch patterns (core-*-n0-s1): run this slice of the grid")
    p.add_argument("--slurm", action="store_true", help="submit as a Slurm job array (minpro-slurm sweep)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the job files only")
    a = p.parse_args(rest)
    if a.grid and (a.methods or a.staleness or a.seeds):
        raise ConfigError("--grid replaces --methods/--staleness/--seeds; put those axes in the grid file")
    a.methods, a.staleness, a.seeds = a.methods or "grpo,minpro", a.staleness or "0,2", a.seeds or "1"
    if a.slurm:
        if a.grid:
            raise ConfigError("--grid is not supported with --slurm yet; use --methods/--staleness/--seeds")
        from minpro_megatron.slurm.submit import main as slurm_main

        extra = ["--methods", a.methods, "--staleness", a.staleness, "--seeds", a.seeds, "--run-dir", str(a.out)]
        return slurm_main(["sweep", a.config, *a.overrides, *extra, *(["--dry-run"] if a.dry_run else [])])
    from minpro_megatron.preflight import check_run_inputs

    check_run_inputs(load_config(a.config, a.overrides))  # before any run folder is made
    if a.grid:
        cells = load_grid(a.grid)
    else:
        from minpro_megatron.slurm.submit import sweep_tasks

        cells = [Cell(t.name, tuple(t.overrides)) for t in sweep_tasks(a.config, a.overrides, _grid(a))]
    if a.only:
        cells = select_cells(cells, a.only)
    run_local(a.config, a.overrides, cells, a.out, checkpoint_root=a.checkpoint_root, keep_going=a.keep_going)
    table, plots = collect(a.out / "runs", a.out, cells)
    print(table.read_text())
    return 0




if __name__ == "__main__":
    sys.exit(main())

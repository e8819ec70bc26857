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
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.config.base import UserError
from minpro_megatron.metrics.report import read_scalars, write_csv, write_markdown_table

__all__ = ["main", "collect", "run_local", "load_grid", "run_stats", "Cell", "SWEEP_PLOT_TAGS"]

SWEEP_PLOT_TAGS = ["eval/accuracy", "rollout/reward_mean", "loss/kl_k3", "loss/entropy", "loss/clip_frac_high", "loss/rho_min_mean"]
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


def read_run_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from tb/metrics.jsonl (the small file a study commits; later rows win per
    step, so a resumed run's rewritten steps count once), else from the TensorBoard events."""
    jsonl = run_dir / "tb" / "metrics.jsonl"
    if not jsonl.is_file():
        return read_scalars(run_dir / "tb")
    by_tag: dict[str, dict[int, float]] = defaultdict(dict)
    for line in jsonl.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = int(row.pop("step"))
        for k, v in row.items():
            by_tag[k][step] = float(v)  # "nan" / "inf" strings parse as floats
    return {k: sorted(v.items()) for k, v in by_tag.items()}


def _run_info(run_dir: Path) -> dict | None:
    if not (run_dir / "config.yaml").is_file() and (run_dir / "output").is_dir():
        run_dir = run_dir / "output"  # a Slurm array task: RUN_DIR/output is the trainer's output dir
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file() or not (run_dir / "tb").is_dir():
        return None
    if (run_dir / CELL_FILE).is_file() and not is_done(run_dir):
        return None  # a sweep cell still running or interrupted: not a result yet
    cfg = yaml.safe_load(cfg_file.read_text())
    cell = json.loads((run_dir / CELL_FILE).read_text()) if (run_dir / CELL_FILE).is_file() else {}
    done = json.loads((run_dir / DONE_MARKER).read_text()) if (run_dir / DONE_MARKER).is_file() else {}
    method = cell.get("method") or (
        cfg["loss"]["name"] + ("" if cfg["loss"].get("prefix_stat", "min") == "min" or cfg["loss"]["name"] != "minpro"
                               else f"-{cfg['loss']['prefix_stat']}"))
    return {
        "group": cell.get("group", ""),
        "method": method,
        "staleness": int(cfg["rollout"]["staleness"]["n"]),
        "seed": int(cfg["train"]["seed"]),
        "name": run_dir.name,
        "wall_s": float(done.get("wall_s", math.nan)),
        "load_1min": float(done.get("loadavg_start", [math.nan])[0]),
        "scalars": read_run_scalars(run_dir),
    }


def run_stats(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """The study's per-run numbers (docs/staleness_study.md defines them):
    acc_start / acc_final / acc_best: greedy held-out accuracy at RL step 0, at the last evaluation, and the
    best evaluation after step 0; reward_auc: mean sampled reward over all RL steps (area under the reward
    curve per step); collapsed: 1 if the final accuracy is below half the start accuracy or any step's
    loss or reward is non-finite; kl_k3, clip_high, clip_low, rho_min_mean, rho_min_p10: means over RL
    steps; rho_min_min: the smallest prefix-min ratio seen in any step."""

    def vals(tag: str) -> list[float]:
        return [v for _, v in scalars.get(tag, [])]

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if math.isfinite(x)]
        return statistics.fmean(xs) if xs else math.nan

    evals = scalars.get("eval/accuracy", [])
    start = next((v for s, v in evals if s == 0), math.nan)
    later = [v for s, v in evals if s > 0 and math.isfinite(v)]
    final = evals[-1][1] if evals and evals[-1][0] > 0 else math.nan
    rewards = vals("rollout/reward_mean")
    nonfinite = any(not math.isfinite(v) for v in rewards + vals("optim/grad_norm") + vals("loss/kl_k3"))
    collapsed = nonfinite or (math.isfinite(final) and math.isfinite(start) and final < 0.5 * start)
    rho_min = [v for v in vals("loss/rho_min_min") if math.isfinite(v)]
    return {
        "acc_start": start,
        "acc_final": final,
        "acc_best": max(later) if later else math.nan,
        "reward_auc": mean(rewards),
        "collapsed": 1.0 if collapsed else 0.0,
        "kl_k3": mean(vals("loss/kl_k3")),
        "clip_high": mean(vals("loss/clip_frac_high")),
        "clip_low": mean(vals("loss/clip_frac_low")),
        "rho_min_mean": mean(vals("loss/rho_min_mean")),
        "rho_min_p10": mean(vals("loss/rho_min_p10")),
        "rho_min_min": min(rho_min) if rho_min else math.nan,
        "entropy": mean(vals("loss/entropy")),
    }


STUDY_COLUMNS = ["acc_start", "acc_final", "acc_best", "reward_auc", "collapsed", "kl_k3", "clip_high", "clip_low",
                 "rho_min_mean", "rho_min_p10", "rho_min_min"]


def _pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.3g} ± {std:.2g}" if n > 1 else f"{mean:.3g}"


def collect(runs_dir: str | Path, out_dir: str | Path | None = None,
            expected: Sequence[Cell] | None = None) -> tuple[Path, list[Path]]:
    """Tables and PNG plots of every finished run under ``runs_dir``:
    sweep_table.md / .csv: one row per (group, method, staleness) with mean and std over seeds of the
    last 5 logged points (legacy columns) and of ``run_stats`` (study columns); sweep_runs.csv: every run's
    own numbers; one PNG per metric over steps (seed means) and sweep_accuracy_vs_staleness.png.
    ``expected``: the grid's cells, so the table says which are still pending (sweep_pending.txt)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir} is not a directory: pass the runs/ folder of a sweep (minpro-sweep collect DIR/runs)")
    out = Path(out_dir) if out_dir else runs_dir.parent
    out.mkdir(parents=True, exist_ok=True)
    infos = [i for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if (i := _run_info(d))]
    if not infos:
        raise UserError(f"no finished runs (config.yaml + tb/) under {runs_dir}")
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for info in infos:
        info["stats"] = run_stats(info["scalars"])
        cells[(info["group"], info["method"], info["staleness"])].append(info)
    order = sorted(cells, key=lambda k: (k[0], k[2], k[1]))
    rows, md_rows = [], []
    for key in order:
        group, method, n = key
        runs = cells[key]
        row: dict[str, object] = {"method": method, "staleness": n, "group": group, "seeds": len(runs)}
        md: dict[str, object] = {"method": method, "staleness": n, "group": group,
                                 "seeds": ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))}
        for col in STUDY_COLUMNS:
            vals = [r["stats"][col] for r in runs]
            if col == "collapsed":
                row[col] = sum(vals)
                md[col] = f"{int(sum(vals))}/{len(vals)}"
                continue
            fin = [v for v in vals if not math.isnan(v)]
            row[col] = statistics.fmean(fin) if fin else math.nan
            row[f"{col}_std"] = statistics.stdev(fin) if len(fin) > 1 else 0.0
            md[col] = _pm(row[col], row[f"{col}_std"], len(fin))  # type: ignore[arg-type]
        for col, tag in TABLE_TAGS.items():  # last-5-point means; "_last5" where a study column has the name
            key = f"{col}_last5" if col in STUDY_COLUMNS else col
            vals = [_last(r["scalars"].get(tag, [])) for r in runs]
            vals = [v for v in vals if not math.isnan(v)]
            row[key] = statistics.fmean(vals) if vals else math.nan
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        peak = [max((v for _, v in r["scalars"].get("rollout/reward_mean", [])), default=math.nan) for r in runs]
        row["reward_peak"] = statistics.fmean(peak) if peak else math.nan
        rows.append(row)
        md_rows.append(md)
    table = out / "sweep_table.md"
    text = write_markdown_table(md_rows, None, title=f"Staleness sweep ({len(infos)} finished runs; mean ± std over seeds)")
    pending = [c.name for c in expected or [] if not any(i["name"] == c.name for i in infos)]
    if expected is not None:
        text += f"\n{len(infos)} of {len(expected)} cells finished; {len(pending)} pending.\n"
        (out / "sweep_pending.txt").write_text("".join(f"{p}\n" for p in pending))
    table.write_text(text)
    write_csv(rows, out / "sweep_table.csv")
    write_csv([{"name": i["name"], "group": i["group"], "method": i["method"], "staleness": i["staleness"],
                "seed": i["seed"], **i["stats"], "wall_s": i["wall_s"], "load_1min_at_start": i["load_1min"]}
               for i in sorted(infos, key=lambda i: i["name"])], out / "sweep_runs.csv")
    plots = [_plot_by_staleness(cells, order, tag, out / f"sweep_{tag.replace('/', '_')}.png") for tag in SWEEP_PLOT_TAGS]
    plots.append(_plot_vs_staleness(rows, out / "sweep_accuracy_vs_staleness.png"))
    return table, plots


RESULTS_BEGIN = "<!-- results:begin (written by minpro-sweep collect --doc; do not edit) -->"
RESULTS_END = "<!-- results:end -->"


def update_doc(doc: Path, table: Path, plots: Sequence[Path]) -> None:
    """Replace the block between RESULTS_BEGIN and RESULTS_END of ``doc`` with the table (its heading
    demoted under the doc's own) and links to the plots, relative to the doc."""
    text = doc.read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ValueError(f"{doc} has no results block; add the lines {RESULTS_BEGIN!r} and {RESULTS_END!r}")
    head, rest = text.split(RESULTS_BEGIN, 1)
    _, tail = rest.split(RESULTS_END, 1)
    body = table.read_text().replace("## ", "#### ", 1)
    links = "\n".join(f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in plots)
    doc.write_text(f"{head}{RESULTS_BEGIN}\n{body}\n{links}\n{RESULTS_END}{tail}")


def _seed_mean(series) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for pts in series:
        for s, v in pts:
            by_step[s].append(v)
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def _plot_by_staleness(cells: dict[tuple[str, str, int], list[dict]], order: Sequence[tuple[str, str, int]], tag: str,
                       path: Path) -> Path:
    """One panel per staleness n, one line per (group, method): the seed mean of ``tag`` over steps
    (dense series smoothed over 3 points, sparse ones such as evaluations drawn as they are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({k[2] for k in order})
    labels = sorted({(k[0], k[1]) for k in order})
    colors = {lab: plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")(i) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(1, len(ns), figsize=(3.4 * len(ns), 2.9), squeeze=False, sharey=True)
    for ax, n in zip(axes.flat, ns):
        for key in [k for k in order if k[2] == n]:
            pts = _seed_mean(r["scalars"].get(tag, []) for r in cells[key])
            if not pts:
                continue
            vals = [v for _, v in pts]
            if len(vals) > 12:
                vals = [statistics.fmean(vals[max(0, i - 2): i + 1]) for i in range(len(vals))]
            group, method = key[0], key[1]
            ax.plot([s for s, _ in pts], vals, lw=1.3, color=colors[(group, method)],
                    label=f"{group + ':' if group else ''}{method} ({len(cells[key])} seeds)")
        ax.set_title(f"n = {n}", fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    axes.flat[0].set_ylabel(tag, fontsize=8)
    fig.suptitle(f"{tag} (seed means) by staleness n", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_vs_staleness(rows: Sequence[dict], path: Path) -> Path:
    """Final greedy accuracy, reward AUC and k3 KL (mean ± std over seeds) against staleness n, one line per
    (group, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("acc_final", "final greedy accuracy"), ("reward_auc", "reward AUC (mean reward per step)"),
              ("kl_k3", "mean k3 KL to behaviour")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.3), squeeze=False)
    lines: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        lines[(str(r["group"]), str(r["method"]))].append(r)
    for ax, (col, title) in zip(axes.flat, panels):
        for (group, method), rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["staleness"])
            ax.errorbar([r["staleness"] for r in rs], [r[col] for r in rs], yerr=[r.get(f"{col}_std", 0.0) for r in rs],
                        marker="o", ms=3, lw=1.2, capsize=2, label=f"{group + ':' if group else ''}{method}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("staleness n", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Cell:
    """One grid point: its run name, the overrides that make it, and the labels the collector groups by
    (``group`` / ``method`` from a grid file; empty for a --methods/--staleness/--seeds sweep, where the
    collector derives the method from the run's config)."""

    name: str
    overrides: tuple[str, ...]
    group: str = ""
    method: str = ""


DONE_MARKER = "cell_done.json"
FAILED_MARKER = "cell_failed.json"
CELL_FILE = "cell.json"


def load_grid(path: str | Path) -> list[Cell]:
    """Cells of a grid file (examples/study/grid.yaml documents the format):

        seeds: [1, 2, 3]
        methods: {grpo: [loss.name=grpo, loss.dual_clip=3.0], minpro: [loss.name=minpro]}
        groups:
          - {name: core, methods: [grpo, minpro], staleness: [0, 2], overrides: []}
        order: seed-major     # all groups of seed 1 first (default), or group-major

    Cell names are GROUP-METHOD-nN-sSEED. Within a seed, groups, methods and staleness keep file order."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"sweep grid {str(path)!r}: cannot read it ({exc})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep grid {path}: expected a mapping with seeds, methods and groups")
    unknown = set(spec) - {"seeds", "methods", "groups", "order"}
    if unknown:
        raise ConfigError(f"sweep grid {path}: unknown key(s) {sorted(unknown)}; allowed: seeds, methods, groups, order")
    seeds, methods, groups = spec.get("seeds"), spec.get("methods"), spec.get("groups")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        raise ConfigError(f"sweep grid {path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"sweep grid {path}: 'methods' must map a method name to its list of overrides")
    for m, ovr in methods.items():
        if not isinstance(ovr, list) or not all(isinstance(o, str) and "=" in o for o in ovr):
            raise ConfigError(f"sweep grid {path}: methods.{m} must be a list of 'key=value' overrides, got {ovr!r}")
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"sweep grid {path}: 'groups' must be a non-empty list")
    order = spec.get("order", "seed-major")
    if order not in ("seed-major", "group-major"):
        raise ConfigError(f"sweep grid {path}: order={order!r}; use seed-major or group-major")
    per_group: list[list[tuple[str, str, int, tuple[str, ...]]]] = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.]+", g["name"]):
            raise ConfigError(f"sweep grid {path}: groups[{i}] needs a 'name' of letters, digits, '_' or '.'")
        bad = set(g) - {"name", "methods", "staleness", "overrides"}
        if bad:
            raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}): unknown key(s) {sorted(bad)}")
        for m in g.get("methods") or []:
            if m not in methods:
                raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}) uses method {m!r}, not defined under 'methods'")
        ns = g.get("staleness")
        if not g.get("methods") or not isinstance(ns, list) or not ns or not all(isinstance(n, int) and n >= 0 for n in ns):
            raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}) needs 'methods' and 'staleness' (integers >= 0)")
        extra = tuple(g.get("overrides") or [])
        per_group.append([(g["name"], m, n, extra) for m in g["methods"] for n in ns])
    keyed = [(seed, gi, j, cell) for gi, cells in enumerate(per_group) for j, cell in enumerate(cells) for seed in seeds]
    keyed.sort(key=(lambda k: (seeds.index(k[0]), k[1], k[2])) if order == "seed-major"
               else (lambda k: (k[1], seeds.index(k[0]), k[2])))
    out, names = [], set()
    for seed, _, _, (group, method, n, extra) in keyed:
        name = f"{group}-{method}-n{n}-s{seed}"
        if name in names:
            raise ConfigError(f"sweep grid {path}: cell {name} appears twice")
        names.add(name)
        ovr = (*methods[method], *extra, f"rollout.staleness.n={n}", f"train.seed={seed}")
        out.append(Cell(re.sub(r"[^A-Za-z0-9_.=-]", "_", name), ovr, group, method))
    return out


def select_cells(cells: Sequence[Cell], only: str) -> list[Cell]:
    """The cells matching any of the comma-separated names / fnmatch patterns, in grid order."""
    import fnmatch

    pats = [p for p in only.split(",") if p]
    for pat in pats:
        if not any(fnmatch.fnmatchcase(c.name, pat) for c in cells):
            raise ConfigError(f"--only: {pat!r} matches no cell of the grid (e.g. {cells[0].name})")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


def validate_cells(config: str, overrides: Sequence[str], cells: Sequence[Cell]) -> None:
    """Every cell's config must load and validate (as the single local process that runs it) before the
    first run starts; errors name the cell."""
    for c in cells:
        try:
            load_config(config, [*overrides, *c.overrides]).validate(world_size=1)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {c.name} ({' '.join(c.overrides)}): {exc}") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write-then-rename (fsync'd): a marker is either absent or complete, never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_done(run_dir: Path) -> bool:
    """The cell's completion marker exists; a run directory of an older sweep (no cell.json, finished when
    it wrote summary.md) also counts, so upgrading never deletes finished runs."""
    if (run_dir / DONE_MARKER).is_file():
        return True
    return not (run_dir / CELL_FILE).exists() and (run_dir / "summary.md").is_file()


def cell_checkpoint_dir(config: str, overrides: Sequence[str], cell: Cell, checkpoint_root: Path | None) -> Path | None:
    """Each cell's own checkpoint directory: CHECKPOINT_ROOT/<cell>, else <base checkpoint.dir>/<cell> when the
    base config sets one (a shared directory would make cells resume from and prune each other's
    checkpoints), else None (the trainer's default, <run dir>/checkpoints, is already per cell)."""
    if checkpoint_root is not None:
        return checkpoint_root / cell.name
    base = load_config(config, list(overrides)).checkpoint.dir
    return Path(base) / cell.name if base else None


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
                extra = [f"logging.output_dir={run_dir}"] + ([f"checkpoint.dir={ckpt}"] if ckpt is not None else [])
                cmd = [sys.executable, "-m", "minpro_megatron.cli", "train", config, *overrides, *cell.overrides, *extra]
                info = {"name": cell.name, "group": cell.group, "method": cell.method, "overrides": list(cell.overrides),
                        "command": cmd[1:], "checkpoint_dir": str(ckpt) if ckpt else None}
                _write_json_atomic(run_dir / CELL_FILE, info)
                t0, load0 = time.time(), os.getloadavg()
                with open(run_dir / "train.log", "w") as log:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
                record = {"name": cell.name, "exit_code": rc, "wall_s": round(time.time() - t0, 1),
                          "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                          "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()}
                if rc or not (run_dir / "summary.md").is_file():
                    _write_json_atomic(run_dir / FAILED_MARKER, record)
                    if not keep_going:
                        raise UserError(f"sweep run {cell.name} failed (exit {rc}); see {run_dir / 'train.log'}")
                    failed.append(cell.name)
                    progress.advance(bar)
                    continue
                _write_json_atomic(run_dir / DONE_MARKER, record)
            done.append(run_dir)
            progress.advance(bar)
    if failed:
        print(f"sweep: {len(failed)} cell(s) failed and will be retried on the next call: {', '.join(failed)}", file=sys.stderr)
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

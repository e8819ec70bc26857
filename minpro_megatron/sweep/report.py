"""The sweep collector: the runs' TensorBoard scalars -> a table (Markdown + CSV), PNG plots, and the
results block of a study document."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import yaml

from minpro_megatron.config.base import UserError
from minpro_megatron.metrics.report import read_scalars, write_csv, write_markdown_table
from minpro_megatron.sweep.grid import CELL_FILE, DONE_MARKER, Cell, is_done
from minpro_megatron.sweep.protocol import cell_keys, check_one_protocol


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
    name = run_dir.name  # a Slurm array task's name is its folder's, not "output"
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
    # what this run varies by design: its cell's overrides, else (no record of them) the sweep axes
    vary = cell_keys(cell["overrides"]) if "overrides" in cell else {"loss.", "rollout.staleness.n", "train.seed"}
    return {
        "group": cell.get("group", ""),
        "method": method,
        "staleness": int(cfg["rollout"]["staleness"]["n"]),
        "seed": int(cfg["train"]["seed"]),
        "name": name,
        "wall_s": float(done.get("wall_s", math.nan)),
        "load_1min": float(done.get("loadavg_start", [math.nan])[0]),
        "scalars": read_run_scalars(run_dir),
        "config": cfg,
        "vary": vary | {"loss.name", "rollout.staleness.n", "train.seed"},
        "fixed_warm_steps": float((cfg.get("train") or {}).get("warm_start_steps", math.nan)),
    }


def warm_start_stats(scalars: dict[str, list[tuple[int, float]]], fixed_steps: float = math.nan) -> dict[str, float]:
    """warm_steps: supervised steps taken (logged at RL step 0 by a warm start to a criterion, else the fixed
    train.warm_start_steps); warm_cap_hit: 1 if that warm start ended at its cap without meeting the criterion,
    0 if it met it, nan for the fixed rule (train/warm_start.py)."""
    taken = scalars.get("warm_start/steps_taken", [])
    hit = scalars.get("warm_start/cap_hit", [])
    return {"warm_steps": taken[-1][1] if taken else fixed_steps, "warm_cap_hit": hit[-1][1] if hit else math.nan}


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
                 "rho_min_mean", "rho_min_p10", "rho_min_min", "warm_steps"]


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
        if expected is None:
            raise UserError(f"no finished runs (config.yaml + tb/) under {runs_dir}")
        return _write_empty(out, expected), []
    check_one_protocol(infos)  # never one row from two protocols (sweep/protocol.py)
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for info in infos:
        info["stats"] = {**run_stats(info["scalars"]), **warm_start_stats(info["scalars"], info["fixed_warm_steps"])}
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
    capped = sorted(i["name"] for i in infos if i["stats"]["warm_cap_hit"] == 1.0)
    if capped:  # their RL may have had nothing to learn from (docs/staleness_study.md, the v1 finding)
        text += (f"\n**Warm start hit its cap without meeting its criterion** in {len(capped)} run(s): {', '.join(capped)}. "
                 "Their RL may have had nothing to learn from; read their rows with that in mind.\n")
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


def _write_empty(out: Path, expected: Sequence[Cell]) -> Path:
    """A sweep with no finished cell yet: the table says so and every cell is pending."""
    table = out / "sweep_table.md"
    table.write_text(f"## Staleness sweep (0 finished runs)\n\n0 of {len(expected)} cells finished; {len(expected)} pending.\n")
    (out / "sweep_pending.txt").write_text("".join(f"{c.name}\n" for c in expected))
    return table


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



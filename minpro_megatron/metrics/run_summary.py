"""End-of-run report of one training run: summary.md (what was run, then a table) and plot.png, from its
config.yaml and TensorBoard events. Internal metrics (``debug/...``) are never shown."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from minpro_megatron.metrics.report import plot_runs, read_scalars, read_wall_span, summary_rows, write_markdown_table

__all__ = ["SUMMARY_TAGS", "PLOT_TAGS", "WARM_START_TAG", "INTERNAL_PREFIX", "run_description", "write_run_summary"]

INTERNAL_PREFIX = "debug/"  # checks for tests and resume (e.g. debug/batch_digest): metrics.jsonl only
WARM_START_TAG = "warm_start/nll"
SUMMARY_TAGS = [
    "rollout/reward_mean",
    "rollout/accuracy",
    "eval/accuracy",
    "rollout/response_length",
    "loss/entropy",
    "loss/clip_frac_high",
    "loss/clip_frac_low",
    "loss/rho_min_mean",
    "loss/rho_min_p10",
    "loss/kl_k3",
    "rollout/staleness_mean",
    "optim/grad_norm",
    "time/step_s",
    "time/rollout_s",
    "time/train_s",
    WARM_START_TAG,
]
PLOT_TAGS = [
    WARM_START_TAG,
    "rollout/reward_mean",
    "eval/accuracy",
    "loss/entropy",
    "loss/clip_frac_high",
    "loss/rho_min_mean",
    "rollout/response_length",
]
FEW_POINTS = 20  # below this many points a row shows the first and last value, else 10-point means
WINDOW = 10


def _method(cfg: dict) -> str:
    loss = cfg.get("loss", {})
    name = loss.get("name", "?")
    if name == "minpro" and loss.get("prefix_stat", "min") != "min":
        name += f" (prefix_stat={loss['prefix_stat']})"
    return name


def _model(cfg: dict) -> str:
    m = cfg.get("model", {})
    text = f"{m.get('num_layers')} layers, hidden {m.get('hidden_size')}"
    if m.get("num_experts"):
        text += f", {m['num_experts']} experts top-{m.get('moe_router_topk')}"
    return text + (f", from {m['hf_path']}" if m.get("hf_path") else ", random init")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600} h " if seconds >= 3600 else "") + f"{seconds % 3600 // 60} min {seconds % 60} s"


def run_description(run_dir: str | Path, scalars: dict[str, list] | None = None) -> dict[str, str]:
    """What was run, in words: method, staleness, steps, wall time, warm start, model, data, learning rate."""
    run_dir = Path(run_dir)
    cfg: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    scalars = read_scalars(run_dir / "tb") if scalars is None else scalars
    train, st = cfg.get("train", {}), cfg.get("rollout", {}).get("staleness", {})
    rl_steps = max((s for s, _ in scalars.get("rollout/reward_mean", [])), default=0)
    out = {
        "method": _method(cfg),
        "staleness": f"{st.get('mode', 'exact')}, n={st.get('n', 0)}",
        "steps": f"{rl_steps} of {train.get('steps', '?')} RL steps "
                 f"({train.get('rollout_batch_size', '?')} prompts x {train.get('group_size', '?')} samples each)",
    }
    span = read_wall_span(run_dir / "tb") if (run_dir / "tb").is_dir() else None
    if span:
        # config.yaml is written when the (last) start begins, before the model is built
        start = min(span[0], (run_dir / "config.yaml").stat().st_mtime) if cfg else span[0]
        out["wall time"] = (f"{_duration(span[1] - start)} from the start (of the last resume, if any) to the last "
                            f"logged metric, {time.strftime('%Y-%m-%d %H:%M', time.localtime(span[1]))}")
    warm = int(train.get("warm_start_steps", 0) or 0)
    nll = scalars.get(WARM_START_TAG, [])
    goal = float(train.get("warm_start_until_accuracy", 0) or 0)
    if warm and goal:
        out["warm start"] = _criterion_warm_start(train, scalars, warm, goal)
        if nll:
            out["warm start"] += f", nll {nll[0][1]:.4g} -> {nll[-1][1]:.4g}"
    elif warm:
        text = f"{warm} supervised steps at lr {train.get('warm_start_lr')}"
        if nll:
            text += f", nll {nll[0][1]:.4g} -> {nll[-1][1]:.4g}"
        out["warm start"] = text
    else:
        out["warm start"] = "none"
    out["model"] = _model(cfg)
    data = cfg.get("data", {})
    out["data"] = data.get("train_path") or data.get("task", "?") if data else "?"
    out["optimizer"] = f"lr {cfg.get('optim', {}).get('lr')}, {train.get('updates_per_batch', 1)} update(s) per batch"
    return out


def _criterion_warm_start(train: dict, scalars: dict[str, list], cap: int, goal: float) -> str:
    """The warm start to a criterion (train/warm_start.py) in words, its outcome first; a cap hit is loud."""
    rule = (f"until sampled accuracy >= {goal:g} (checked every {train.get('warm_start_check_interval')} steps on "
            f"{train.get('warm_start_check_samples')} samples), at most {cap} supervised steps at lr {train.get('warm_start_lr')}")
    checks = ", ".join(f"{v:.3g}@{s}" for s, v in scalars.get("warm_start/sampled_accuracy", []))
    taken = scalars.get("warm_start/steps_taken", [])
    if not taken:
        return f"{rule}; not finished (checks: {checks or 'none'})"
    steps, hit = int(taken[-1][1]), bool(scalars.get("warm_start/cap_hit", [(0, 0.0)])[-1][1])
    if hit:
        return (f"**CAP HIT: {steps} steps without reaching sampled accuracy >= {goal:g}; the RL may have had nothing to "
                f"learn from** ({rule}; checks: {checks})")
    return f"criterion met after {steps} of at most {cap} steps ({rule}; checks: {checks})"


def _title(label: str, desc: dict[str, str]) -> str:
    return (f"{label}: {desc['method']}, staleness {desc['staleness']}, {desc['steps'].split(' (')[0]}, "
            f"{desc['optimizer']}\nwarm start {desc['warm start']}; model {desc['model']}")


def where_to_look(run_dir: str | Path, checkpoint_dir: str | Path | None = None) -> str:
    """The lines a finished run prints: its held-out accuracy, then where its files are (``checkpoint_dir``:
    checkpoint.dir where it is set, else RUN_DIR/checkpoints)."""
    run_dir = Path(run_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints"
    acc = read_scalars(run_dir / "tb").get("eval/accuracy", [])
    lines = [f"greedy held-out accuracy: {acc[0][1]:.3f} (step {acc[0][0]}) -> {acc[-1][1]:.3f} (step {acc[-1][0]})"] if acc else []
    return "\n".join([
        *lines,
        f"summary:     {run_dir / 'summary.md'}",
        f"plot:        {run_dir / 'plot.png'}",
        f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
        f"checkpoints: {checkpoint_dir} (a second run of the same command resumes from the last one)",
    ])


def write_run_summary(run_dir: str | Path, label: str | None = None) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    label = label or run_dir.name
    scalars = {t: v for t, v in read_scalars(run_dir / "tb").items() if not t.startswith(INTERNAL_PREFIX)}
    desc = run_description(run_dir, scalars)
    rows = summary_rows(scalars, [t for t in SUMMARY_TAGS if t in scalars], window=WINDOW, few=FEW_POINTS)
    table = write_markdown_table(rows)
    text = "\n".join([
        f"# Run summary: {label}", "",
        *([f"> WARNING: {desc['warm start']}", ""] if "CAP HIT" in desc["warm start"] else []),
        *(f"- **{k}**: {v}" for k, v in desc.items()), "",
        f"first / last: the first and last logged value of a metric with fewer than {FEW_POINTS} points, else the "
        f"means of its first / last {WINDOW} points. warm_start/nll is on the warm-start step axis.", "",
        table,
    ])
    path = run_dir / "summary.md"
    path.write_text(text)
    plot = plot_runs({label: scalars}, [t for t in PLOT_TAGS if t in scalars], run_dir / "plot.png",
                     title=_title(label, desc), smooth=3, xlabels={WARM_START_TAG: "warm-start step"})
    return path, plot

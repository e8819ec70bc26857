"""End-of-run report of one training run: summary.md (table) and plot.png, from its TensorBoard events."""

from __future__ import annotations

from pathlib import Path

from minpro_megatron.logging.report import plot_runs, read_scalars, summary_rows, write_markdown_table

__all__ = ["SUMMARY_TAGS", "PLOT_TAGS", "write_run_summary"]

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
]
PLOT_TAGS = [
    "rollout/reward_mean",
    "eval/accuracy",
    "loss/entropy",
    "loss/clip_frac_high",
    "loss/rho_min_mean",
    "rollout/response_length",
]


def write_run_summary(run_dir: str | Path, label: str | None = None) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir / "tb")
    rows = summary_rows(scalars, [t for t in SUMMARY_TAGS if t in scalars], window=10)
    table = run_dir / "summary.md"
    write_markdown_table(rows, table, title=f"Run summary: {label or run_dir.name} (means of the first / last 10 logged points)")
    plot = plot_runs({label or run_dir.name: scalars}, [t for t in PLOT_TAGS if t in scalars], run_dir / "plot.png",
                     title=label or run_dir.name, smooth=3)
    return table, plot

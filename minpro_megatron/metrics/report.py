"""Read scalars back from TensorBoard event files (tensorboard's own reader) and turn them into
tables (Markdown / CSV) and PNG plots: the run summary of the trainer and the staleness-sweep report."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = ["read_scalars", "read_wall_span", "summary_rows", "write_markdown_table", "write_csv", "plot_runs"]


def read_wall_span(log_dir: str | Path) -> tuple[float, float] | None:
    """(first, last) wall-clock time (Unix seconds) of the scalar events under ``log_dir``; None if none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    times = [e.wall_time for tag in acc.Tags().get("scalars", []) for e in acc.Scalars(tag)]
    return (min(times), max(times)) if times else None


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under ``log_dir`` and its direct subdirectories
    (e.g. tb/warm_start, a separate step axis; later writes win per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    dirs = [Path(log_dir)] + sorted(p for p in Path(log_dir).glob("*") if p.is_dir() and any(p.glob("events.out.tfevents*")))
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag in out:
                continue  # the top-level run wins
            by_step = {e.step: e.value for e in acc.Scalars(tag)}
            out[tag] = sorted(by_step.items())
    return out


def _window_mean(points: Sequence[tuple[int, float]], first: bool, k: int) -> float:
    vals = [v for _, v in (points[:k] if first else points[-k:]) if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summary_rows(
    scalars: Mapping[str, Sequence[tuple[int, float]]], tags: Iterable[str], window: int = 5, few: int = 20
) -> list[dict]:
    """Per tag: first and last value (means of the first / last ``window`` points once a series has at
    least ``few`` points: a sparse series such as evaluations shows its real endpoints), min, max, points."""
    rows = []
    for tag in tags:
        pts = scalars.get(tag, [])
        vals = [v for _, v in pts if not math.isnan(v)]
        k = window if len(pts) >= few else 1
        rows.append(
            {
                "metric": tag,
                "first": _window_mean(pts, True, k),
                "last": _window_mean(pts, False, k),
                "min": min(vals) if vals else math.nan,
                "max": max(vals) if vals else math.nan,
                "points": len(pts),
            }
        )
    return rows


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_markdown_table(rows: Sequence[Mapping[str, object]], path: str | Path | None = None, title: str = "") -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
        *("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def write_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_runs(
    runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    tags: Sequence[str],
    path: str | Path,
    title: str = "",
    smooth: int = 1,
    xlabels: Mapping[str, str] | None = None,
) -> Path:
    """One panel per tag, one line per run. ``runs``: {label: read_scalars(...)}; ``xlabels``: the x-axis
    label of a tag's panel when it is not "step" (e.g. warm-start steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tags)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for label, scalars in runs.items():
            pts = scalars.get(tag, [])
            if not pts:
                continue
            steps = [s for s, _ in pts]
            vals = [v for _, v in pts]
            if smooth > 1 and len(vals) > 4 * smooth:  # sparse series (evaluations) are drawn as they are
                vals = [sum(vals[max(0, i - smooth + 1) : i + 1]) / len(vals[max(0, i - smooth + 1) : i + 1]) for i in range(len(vals))]
            ax.plot(steps, vals, label=label, lw=1.4)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel((xlabels or {}).get(tag, "step"), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.95 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

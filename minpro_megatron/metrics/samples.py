"""Per-step sample dumps (``logging.dump_samples: N``) and ``minpro-samples``, their viewer.

Each RL step appends N rows to ``OUTPUT_DIR/samples.jsonl`` (rank 0's first N samples of the step's
batch), scored by the learner right before the step's update, so ``ratio`` is pi_theta / mu at the moment
the loss sees the sample:

    {"step": 12, "index": 0, "prompt": "37+45=", "response": "82", "answer": "82", "data_source": "arithmetic",
     "reward": 1.0, "advantage": 0.93, "versions": [10, 10], "tokens": ["8", "2", "<eos>"],
     "behaviour_logp": [...], "logp": [...], "ratio": [...], "prefix_min": [...],
     "ratio_min": 0.97, "ratio_max": 1.04, "prefix_min_last": 0.97}

``prefix_min[t]`` is MinPRO's exclusive prefix minimum min_{i<t} ratio[i] (``loss.prefix_first_value`` at
t = 0). jq works too: ``jq -c 'select(.step == 12) | {reward, advantage, ratio_min}' RUN/samples.jsonl``.

    minpro-samples RUN_DIR [--step S | --last] [--limit K] [--tokens]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SAMPLES_FILE", "exclusive_prefix_min", "sample_row", "append_rows", "read_rows", "main"]

SAMPLES_FILE = "samples.jsonl"


def exclusive_prefix_min(ratios: Sequence[float], first_value: float = 1.0) -> list[float]:
    out, running = [], first_value
    for i, r in enumerate(ratios):
        out.append(running if i else first_value)
        running = r if i == 0 else min(running, r)
    return out


def sample_row(step: int, index: int, *, prompt: str, response: str, answer: str, data_source: str, reward: float,
               advantage: float, versions: Sequence[int], tokens: Sequence[str], behaviour_logp: Sequence[float],
               logp: Sequence[float], prefix_first_value: float = 1.0) -> dict[str, Any]:
    ratios = [math.exp(a - b) for a, b in zip(logp, behaviour_logp)]
    prefix = exclusive_prefix_min(ratios, prefix_first_value)
    return {
        "step": step, "index": index, "prompt": prompt, "response": response, "answer": answer,
        "data_source": data_source, "reward": reward, "advantage": advantage,
        "versions": [min(versions), max(versions)] if versions else [],
        "tokens": list(tokens), "behaviour_logp": [round(v, 6) for v in behaviour_logp],
        "logp": [round(v, 6) for v in logp], "ratio": [round(v, 6) for v in ratios],
        "prefix_min": [round(v, 6) for v in prefix],
        "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
        "prefix_min_last": prefix[-1] if prefix else None,
    }


def append_rows(run_dir: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(run_dir) / SAMPLES_FILE
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_rows(run_dir: str | Path) -> list[dict]:
    """Rows of RUN_DIR/samples.jsonl (a resumed run rewrites its later steps: the last write of a step wins)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / SAMPLES_FILE
    if not path.is_file():
        from minpro_megatron.config.base import UserError

        raise UserError(f"{path} does not exist: run with logging.dump_samples=N (N samples per step)")
    by_key: dict[tuple[int, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_key[(row["step"], row["index"])] = row
    return [by_key[k] for k in sorted(by_key)]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    from minpro_megatron.cli_support import Parser

    p = Parser(prog="minpro-samples", description="show the samples a run dumped (logging.dump_samples)")
    p.add_argument("run_dir", help="the run's output folder (or its samples.jsonl)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, help="only this RL step")
    g.add_argument("--last", action="store_true", help="only the last step")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per step")
    p.add_argument("--tokens", action="store_true", help="per-token ratio and prefix minimum")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    rows = read_rows(a.run_dir)
    steps = sorted({r["step"] for r in rows})
    if a.last and steps:
        rows = [r for r in rows if r["step"] == steps[-1]]
    elif a.step is not None:
        rows = [r for r in rows if r["step"] == a.step]
        if not rows:
            from minpro_megatron.config.base import UserError

            raise UserError(f"no samples of step {a.step}; dumped steps: {steps[0]}..{steps[-1]}" if steps else "no samples")
    shown: dict[int, int] = {}
    for r in rows:
        shown[r["step"]] = shown.get(r["step"], 0) + 1
        if a.limit is not None and shown[r["step"]] > a.limit:
            continue
        print(f"step {r['step']} #{r['index']}  reward {r['reward']:g}  adv {r['advantage']:+.3f}  "
              f"ratio {_fmt(r['ratio_min'])}..{_fmt(r['ratio_max'])}  prefix-min {_fmt(r['prefix_min_last'])}  "
              f"versions {r['versions']}  {r['prompt']!r} -> {r['response']!r} (answer {r['answer']!r})")
        if a.tokens:
            for tok, ratio, pm in zip(r["tokens"], r["ratio"], r["prefix_min"]):
                print(f"    {tok!r:>12}  ratio {ratio:.4f}  prefix-min {pm:.4f}")
    return 0

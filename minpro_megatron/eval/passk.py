"""pass@k of a policy checkpoint on JSONL / parquet benchmarks (AIME / AMC / MATH500-style files).

    minpro-eval [CONFIG] --checkpoint RUN_DIR --data aime24.jsonl [--data math500.jsonl] --n 16 --k 1,4,16 [overrides]

``--checkpoint`` takes a run folder (its ``checkpoints/``), a checkpoint root or one ``iter_XXXXXXX``
folder; CONFIG defaults to the run's config.yaml. Rows are graded by their ``data_source`` (rewards/,
docs/data.md); rows without one need ``--data-source`` unless the run trained on a generated task of the
same kind, and the grader used is printed. n samples per problem (temperature rollout.temperature), c of
them correct; the unbiased estimator pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), averaged
over problems. Generation uses the configured rollout backend. SPMD: launch with torchrun for a parallel
layout. Results: a table on stdout and ``RUN_DIR/eval/<data>-iter<N>-<time>.json`` (never overwritten)
with the iteration, the sampling settings, the data path and the grader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["pass_at_k", "main"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (numerically stable product form)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples per problem, got n={n}; raise --n")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None, Path]:
    """(checkpoint root, iteration or None for the latest, run folder) for a run folder, a checkpoint
    root or an ``iter_XXXXXXX`` folder; a UserError that says where it looked otherwise."""
    from minpro_megatron.config.base import UserError
    from minpro_megatron.checkpoint_tracker import has_checkpoint, tracker_path

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--checkpoint {path}: no such directory")
    if path.name.startswith("iter_") and path.name[5:].isdigit():
        root, iteration = path.parent, int(path.name[5:])
    elif has_checkpoint(path):
        root, iteration = path, None
    elif has_checkpoint(path / "checkpoints"):
        root, iteration = path / "checkpoints", None
    else:
        raise UserError(f"--checkpoint {path} holds no checkpoint (looked for {tracker_path(path)} and "
                        f"{tracker_path(path / 'checkpoints')}); pass a run folder or its checkpoints/")
    run_dir = root.parent if root.name == "checkpoints" or (root.parent / "config.yaml").is_file() else root
    return root, iteration, run_dir


def unknown_characters(tokenizer, texts: Sequence[str]) -> list[str]:
    """Characters of ``texts`` that the tokenizer turns into its unknown token (sorted; [] without one)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    chars = sorted(set("".join(texts)))
    return [c for c in chars if unk in tokenizer.encode(c, add_special_tokens=False)]


def choose_sources(problems: list, path: str, data_source: str | None, task: str) -> tuple[list, str]:
    """Fill in rows without a data_source: --data-source, else the run's generated task (arithmetic /
    sorting); a UserError otherwise. Returns the problems and how the sources were decided."""
    import dataclasses

    from minpro_megatron.config.base import UserError
    from minpro_megatron.rewards import registered_sources

    missing = sum(1 for p in problems if not p.data_source)
    if data_source:
        return [dataclasses.replace(p, data_source=data_source) for p in problems], f"--data-source {data_source}"
    if not missing:
        return problems, "the rows' data_source"
    if task in ("arithmetic", "sorting"):
        filled = [p if p.data_source else dataclasses.replace(p, data_source=task) for p in problems]
        return filled, f"data.task={task} of the run config ({missing} rows without data_source)"
    raise UserError(f"{path}: {missing} of {len(problems)} rows have no data_source, which picks the grader; add it to "
                    f"the rows or pass --data-source (registered: {', '.join(registered_sources())}; docs/data.md)")


def _result_path(run_dir: Path, name: str, iteration: int) -> Path:
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = out / (f"{name}-iter{iteration}-{stamp}" + (f"-{i}" if i else "") + ".json")
        try:
            with open(path, "x"):  # claimed atomically: an earlier result is never overwritten
                return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free result name for {name} in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    from minpro_megatron.cli_support import Parser
    from minpro_megatron.config.base import UserError

    p = Parser(prog="minpro-eval", description=__doc__.split("\n")[0], epilog="Graders and the row format: docs/data.md")
    p.add_argument("args", nargs="*", metavar="[CONFIG] [OVERRIDE]",
                   help="run config (default: the run's config.yaml), then section.field=value overrides")
    p.add_argument("--checkpoint", required=True, help="a run folder, its checkpoints/ folder, or one iter_XXXXXXX folder")
    p.add_argument("--data", action="append", required=True, help="benchmark file (.jsonl/.parquet); repeatable")
    p.add_argument("--data-source", default=None, help="grade every row as this data_source (e.g. math, arithmetic)")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--k", default="1", help="comma-separated k values (each <= n)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each file")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        ks = [int(x) for x in a.k.split(",")]
    except ValueError:
        p.error(f"--k {a.k!r} must be comma-separated integers, e.g. 1,4,16")
    if max(ks) > a.n or min(ks) < 1:
        p.error(f"--k {a.k} needs every k in 1..--n ({a.n})")

    from minpro_megatron.cli_support import require_file
    from minpro_megatron.config import load_config
    from minpro_megatron.data.dataset import load_problems
    from minpro_megatron.preflight import check_run_inputs
    from minpro_megatron.rewards import grader_name

    # Every input is checked (and every file read) before a process group or model exists.
    root, iteration, run_dir = resolve_checkpoint(a.checkpoint)
    config = a.args[0] if a.args and "=" not in a.args[0] else None
    overrides = a.args[1:] if config else a.args
    if config is None:
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise UserError(f"no CONFIG given and {config} does not exist: pass the run's config file first")
    cfg = load_config(config, overrides)
    check_run_inputs(cfg)
    data = []
    for path in a.data:
        require_file(path, "--data")
        problems = load_problems(path, cfg.data.prompt_key, cfg.data.answer_key, default_source="")[: a.limit]
        problems, how = choose_sources(problems, path, a.data_source, cfg.data.task)
        graders = sorted({f"{grader_name(pr.data_source)} (data_source={pr.data_source})" for pr in problems})
        data.append((path, problems, how, graders))

    from minpro_megatron.learner.checkpoint import latest_iteration, load_checkpoint
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.learner import Learner
    from minpro_megatron.rollout.types import SamplingParams
    from minpro_megatron.rollout.engine import make_engine
    from minpro_megatron.train.dp import DataParallel
    from minpro_megatron.train.evaluation import correct_counts
    from minpro_megatron.train.tokens import Codec, load_tokenizer

    iteration = latest_iteration(root) if iteration is None else iteration
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        learner = Learner(cfg)
        load_checkpoint(learner, root, iteration, load_optimizer=False)
        tok = load_tokenizer(cfg)
        engine = make_engine(cfg, learner, int(tok.eos_token_id), tok, run_dir / "eval", version=learner.step)
        params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, n=a.n, stop_token_ids=(int(tok.eos_token_id),))
        dp, codec = DataParallel(), Codec(tok, cfg.data.chat_template)
        results = {}
        for path, problems, how, graders in data:
            if ctx.rank == 0:
                print(f"{path}: {len(problems)} problems graded by {', '.join(graders)} (from {how})")
                unknown = unknown_characters(tok, [pr.prompt for pr in problems])
                if unknown:
                    print(f"warning: {path}: the tokenizer does not know {len(unknown)} character(s) of the prompts "
                          f"({', '.join(map(repr, unknown[:20]))}); they become {tok.unk_token!r}", file=sys.stderr)
            c = correct_counts(engine, problems, params, codec, dp, cfg.data.strict_format)
            res: dict = {f"pass@{k}": sum(pass_at_k(a.n, ci, k) for ci in c) / len(c) for k in ks}
            res.update(problems=len(c), graders=graders, data_source_from=how)
            results[path] = res
        if ctx.rank == 0:
            print("| benchmark | problems | " + " | ".join(f"pass@{k}" for k in ks) + " |")
            print("|---|---:|" + "---:|" * len(ks))
            for path, res in results.items():
                print(f"| {Path(path).stem} | {res['problems']} | " + " | ".join(f"{res[f'pass@{k}']:.4f}" for k in ks) + " |")
                record = {
                    "data": str(Path(path).resolve()), "checkpoint": str(root.resolve()), "iteration": iteration,
                    "config": str(Path(config).resolve()), "overrides": list(overrides),
                    "n": a.n, "k": ks, "limit": a.limit,
                    "sampling": {"temperature": params.temperature, "top_p": params.top_p,
                                 "max_new_tokens": params.max_new_tokens, "seed": cfg.train.seed,
                                 "backend": cfg.rollout.backend, "chat_template": cfg.data.chat_template},
                    **res,
                }
                out = _result_path(run_dir, Path(path).stem, iteration)
                out.write_text(json.dumps(record, indent=2))
                print(f"results: {out}")
        engine.close()
    finally:
        destroy_distributed(ctx)
    return 0

"""pass@k of a policy checkpoint on JSONL / parquet benchmarks (AIME / AMC / MATH500-style files).

    minpro-eval CONFIG --checkpoint DIR --data aime24.jsonl [--data math500.jsonl] --n 16 --k 1,4,16 [overrides]

n samples per problem (temperature rollout.temperature), c of them correct (rewards/); the unbiased
estimator pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), averaged over problems. Generation uses
the configured rollout backend (the local engine, or SGLang servers booted from the checkpoint). SPMD:
launch with torchrun for a parallel layout. Results: a table on stdout and DIR/eval_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minpro-eval", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="a learner checkpoint directory (checkpoint.dir of a run)")
    p.add_argument("--data", action="append", required=True, help="benchmark file (.jsonl/.parquet); repeatable")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--k", default="1", help="comma-separated k values (each <= n)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each file")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    ks = [int(x) for x in a.k.split(",")]
    if max(ks) > a.n:
        p.error(f"--k {a.k} has a k larger than --n {a.n}")

    from minpro_megatron.config import load_config
    from minpro_megatron.data.dataset import load_problems
    from minpro_megatron.data.prompts import encode_prompt
    from minpro_megatron.learner.checkpoint import load_checkpoint
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.learner import Learner
    from minpro_megatron.rewards import reward
    from minpro_megatron.rollout.types import SamplingParams
    from minpro_megatron.trainer import load_tokenizer, make_engine

    cfg = load_config(a.config, a.overrides)
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        from megatron.core import parallel_state as ps

        learner = Learner(cfg)
        load_checkpoint(learner, a.checkpoint, load_optimizer=False)
        tok = load_tokenizer(cfg)
        out_dir = Path(a.checkpoint)
        engine = make_engine(cfg, learner, int(tok.eos_token_id), tok, out_dir / "eval", version=learner.step)
        params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, n=a.n, stop_token_ids=(int(tok.eos_token_id),))
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        results = {}
        for path in a.data:
            problems = load_problems(path, cfg.data.prompt_key, cfg.data.answer_key)[: a.limit]
            n_real = len(problems)
            problems += problems[: (-n_real) % dp]  # pad to the DP size; padded copies are dropped below
            mine = problems[r::dp]
            prompts = [encode_prompt(tok, pr.prompt, cfg.data.chat_template) for pr in mine]
            groups = engine.generate(prompts, params)
            counts = []
            for pr, g in zip(mine, groups):
                texts = [tok.decode([t for t in s.response_ids if t != tok.eos_token_id], skip_special_tokens=True) for s in g]
                counts.append(sum(reward(pr.data_source, t, pr.answer, cfg.data.strict_format) >= 1.0 for t in texts))
            local = torch.zeros(len(problems), dtype=torch.float64)
            local[torch.arange(r, len(problems), dp)[: len(counts)]] = torch.tensor(counts, dtype=torch.float64)
            if dist.get_world_size() > 1:
                dist.all_reduce(local, group=ps.get_data_parallel_group())
            c = [int(x) for x in local.tolist()[:n_real]]
            results[Path(path).stem] = {f"pass@{k}": sum(pass_at_k(a.n, ci, k) for ci in c) / len(c) for k in ks}
            results[Path(path).stem]["problems"] = len(c)
        if ctx.rank == 0:
            print("| benchmark | problems | " + " | ".join(f"pass@{k}" for k in ks) + " |")
            print("|---|---:|" + "---:|" * len(ks))
            for name, res in results.items():
                print(f"| {name} | {res['problems']} | " + " | ".join(f"{res[f'pass@{k}']:.4f}" for k in ks) + " |")
                (out_dir / f"eval_{name}.json").write_text(json.dumps({"n": a.n, **res}, indent=2))
        engine.close()
    finally:
        destroy_distributed(ctx)
    return 0

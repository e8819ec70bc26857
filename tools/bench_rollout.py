#!/usr/bin/env python
"""Rollout throughput: the project's client + router vs SGLang's own benchmark client, same server.

One real SGLang CPU server (random tiny Qwen3-MoE, minpro_megatron/models/tiny_hf.py) behind the
project's sglang-router (RolloutFleet). The same prompts (random token ids from SGLang's own sampler,
``sglang.benchmark.datasets.random``, dataset ``random-ids`` with the same seed: nothing is downloaded),
the same sampling settings (temperature, top_p, max_new_tokens, ignore_eos: every request generates
exactly max_new_tokens) and the same concurrency go through, in each repetition, side by side:

* ours: RolloutClient (minpro_megatron/rollout/client.py) -> router -> server, return_logprob on
  (what training needs);
* sglang: SGLang's own client (``sglang.benchmark.serving --backend sglang``, run by this script with a
  stand-in for the uninstalled ``datasets`` import it never calls here) straight to the server, once plain
  and once with ``--return-logprob`` (the same work as ours); both non-streaming, as ours.

Generated tokens/s = tokens generated / wall time of the batch. The ratio ours / sglang is taken per
repetition (the two runs back to back see the same machine load); median and spread are printed.

    python tools/bench_rollout.py [--prompts 64] [--input-len 32] [--output-len 64] [--concurrency 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import report  # noqa: E402

TARGET = 0.9


def _datasets_import_standin() -> None:
    """sglang.benchmark imports every dataset loader, and its MMMU loader imports Hugging Face
    ``datasets``, which this environment does not install. random-ids never calls it: a STAND-IN module
    that only satisfies the import (calling it raises) lets SGLang's real benchmark client run."""
    import importlib.util
    import types

    if importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules:
        stub = types.ModuleType("datasets")

        def load_dataset(*_a, **_k):
            raise RuntimeError("bench_rollout.py stand-in for the uninstalled 'datasets' package")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub


def same_prompts(model_dir: Path, args: argparse.Namespace) -> list[list[int]]:
    """The prompts bench_serving builds for dataset random-ids with --tokenize-prompt and this seed."""
    import numpy as np

    _datasets_import_standin()
    from sglang.benchmark.datasets.random import sample_random_requests
    from transformers import AutoTokenizer

    random.seed(args.seed)
    np.random.seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = sample_random_requests(args.input_len, args.output_len, args.prompts, 1.0, tok, "", random_sample=False, return_text=False)
    return [list(map(int, r.prompt)) for r in rows]


def run_sglang_bench(url: str, model_dir: Path, args: argparse.Namespace, out: Path, logprob: bool) -> dict:
    cmd = [
        sys.executable, __file__, "--sglang-bench", "--backend", "sglang", "--base-url", url,
        "--model", str(model_dir), "--tokenizer", str(model_dir), "--dataset-name", "random-ids", "--tokenize-prompt",
        "--num-prompts", str(args.prompts), "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0", "--seed", str(args.seed),
        "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--warmup-requests", "1",
        "--output-file", str(out), "--disable-tqdm", "--ready-check-timeout-sec", "0", "--disable-stream",
        "--temperature", str(args.temperature), "--top-p", str(args.top_p), *(["--return-logprob"] if logprob else []),
    ]  # --disable-stream: one JSON answer per request, as RolloutClient asks
    if out.exists():
        out.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode or not out.exists():
        raise RuntimeError(f"sglang.benchmark.serving failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    if sys.argv[1:2] == ["--sglang-bench"]:  # child: SGLang's own client, argv passed through
        _datasets_import_standin()
        sys.argv = ["sglang.benchmark.serving", *sys.argv[2:]]
        from sglang.benchmark.serving import cli_main

        cli_main()
        return
    args = ap.parse_args()

    from minpro_megatron.config import RolloutConfig
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir
    from minpro_megatron.rollout.fleet import RolloutFleet
    from minpro_megatron.rollout.types import SamplingParams

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_dir = work / "model"
    make_tiny_model_dir(model_dir, kind="qwen3_moe", seed=1, dtype="float32", initializer_range=0.125)
    prompts = same_prompts(model_dir, args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.output_len, ignore_eos=True)
    cfg = RolloutConfig(backend="sglang", num_servers=1, base_port=0, router_port=0, server_device="cpu",
                        server_dtype="float32", max_new_tokens=args.output_len, router_policy="round_robin")
    rows = []
    with RolloutFleet(cfg, model_dir, work / "logs", monitor_interval_s=None) as fleet:
        server = fleet.server_urls[0]
        client = fleet.client(progress=False, max_concurrency=args.concurrency)
        print(f"server {server} behind router {fleet.generation_endpoints()}; {len(prompts)} prompts x {args.input_len} "
              f"tokens -> {args.output_len} new tokens (ignore_eos), concurrency {args.concurrency}", flush=True)
        client.generate_sync(prompts[:2], params)  # warm-up (bench_serving warms up with one request)
        for rep in range(args.reps):
            def ours() -> tuple[float, int]:
                t = time.perf_counter()
                groups = client.generate_sync(prompts, params)
                return time.perf_counter() - t, sum(len(s.response_ids) for g in groups for s in g)

            if rep % 2 == 0:  # alternate who goes first: a load change then biases both sides alike
                ours_s, ours_tok = ours()
            sg = run_sglang_bench(server, model_dir, args, work / "sg.jsonl", logprob=False)
            sgl = run_sglang_bench(server, model_dir, args, work / "sgl.jsonl", logprob=True)
            if rep % 2 == 1:
                ours_s, ours_tok = ours()
            if sg["total_input_tokens"] != sum(map(len, prompts)):
                raise RuntimeError(f"bench_serving sent {sg['total_input_tokens']} prompt tokens, ours {sum(map(len, prompts))}: not the same prompts")
            row = dict(ours=ours_tok / ours_s, sg=sg["output_throughput"], sgl=sgl["output_throughput"],
                       ours_tok=ours_tok, sg_tok=sg["total_output_tokens"], load=os.getloadavg()[0])
            rows.append(row)
            print(f"rep {rep}: ours {row['ours']:.0f} tok/s ({ours_tok} tokens in {ours_s:.2f} s); sglang bench "
                  f"{row['sg']:.0f} tok/s plain ({row['sg_tok']} tokens), {row['sgl']:.0f} tok/s with return_logprob; load avg {row['load']:.1f}", flush=True)
    r_logp = [r["ours"] / r["sgl"] for r in rows]
    r_plain = [r["ours"] / r["sg"] for r in rows]
    med = statistics.median(r_logp)
    print(f"\nours / sglang bench (same work, return_logprob): median {med:.2f} ({min(r_logp):.2f}-{max(r_logp):.2f}); "
          f"ours / sglang bench plain: median {statistics.median(r_plain):.2f} ({min(r_plain):.2f}-{max(r_plain):.2f})")
    load = max(r["load"] for r in rows)
    report("bench_rollout", f"tiny MoE fp32, 1 CPU server, {args.prompts} prompts x {args.output_len} tokens, concurrency {args.concurrency}",
           f"client+router / sglang.benchmark.serving {med:.2f}x ({min(r_logp):.2f}-{max(r_logp):.2f}) with return_logprob, "
           f"{statistics.median(r_plain):.2f}x vs plain; ours {statistics.median(r['ours'] for r in rows):.0f} tok/s",
           f">= {TARGET}x", med >= TARGET, note=f"load avg up to {load:.1f} on {os.cpu_count()} cores" if load > (os.cpu_count() or 1) else "")


if __name__ == "__main__":
    main()

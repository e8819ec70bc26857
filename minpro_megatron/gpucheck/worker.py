"""One GPU-check measurement in a fresh process (megatron's parallel state is process-global, and the
CPU reference must run with CUDA hidden so the CPU compatibility layer applies).

    python -m minpro_megatron.gpucheck.worker learner --hf-dir D --device cuda --dtype bfloat16 \
        --impl local --out result.json

``learner``: build the Learner from a Hugging Face directory, score a fixed batch, run one MinPRO train
step, score again; writes log-probs, loss and grad norm as JSON.
``export``: build the Learner (fp32) from the directory and stream its weights back out through the HF
exporter over the process group (NCCL on GPU, gloo on CPU); writes the max |difference| per tensor
against the directory's safetensors (expected: bit-exact).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["fixed_batch", "main"]


def fixed_batch(vocab: int, n: int = 8, seed: int = 7) -> list:
    """n samples with prompt and response tokens in [4, vocab) and behaviour log-probs near uniform."""
    from minpro_megatron.learner.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        r = int(torch.randint(6, 40, (1,), generator=g))
        tokens = torch.randint(4, vocab, (p + r,), generator=g)
        old = -math.log(vocab) + 0.3 * torch.randn(r, generator=g)
        adv = float(torch.randn(1, generator=g))
        out.append(TrainSample(tokens, p, old, adv))
    return out


def _learner(hf_dir: str, dtype: str, impl: str):
    from minpro_megatron.config import ModelConfig, RunConfig
    from minpro_megatron.config.hf_model import resolve_model_config
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner

    cfg = RunConfig(model=ModelConfig(hf_path=hf_dir, params_dtype=dtype, transformer_impl=impl))
    cfg.model = resolve_model_config(cfg.model)
    cfg.loss.name = "minpro"
    cfg.train.micro_batch_size = 4
    cfg.optim.lr = 1e-3
    cfg.optim.lr_warmup_steps = 0
    # Adam's lr * m / (sqrt(v) + eps) turns rounding noise in near-zero gradient entries into O(lr)
    # parameter differences at eps 1e-8; eps 1e-3 keeps the step a smooth function of the gradient, so the
    # after-step log-probs compare at the precision of the step itself (as in tests/learner/test_train_step.py).
    cfg.optim.adam_eps = 1e-3
    cfg.rollout.temperature = 1.0
    init_distributed(cfg.parallel, seed=1234)
    learner = Learner(cfg)
    load_hf_weights(learner.model, cfg.model, hf_dir)
    learner.optimizer.reload_model_params()
    return cfg, learner


def run_learner(args: argparse.Namespace) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for the comparison
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    cfg, learner = _learner(args.hf_dir, args.dtype, args.impl)
    batch = fixed_batch(cfg.model.vocab_size)
    before = learner.score(batch)
    step = learner.train_step(batch)
    after = learner.score(batch)
    from minpro_megatron.learner.model_provider import te_usable

    return {
        "device": str(learner.device),
        "dtype": args.dtype,
        "impl": "transformer_engine" if te_usable(cfg.model) else "local",
        "logp_before": [x for t in before for x in t.tolist()],
        "logp_after": [x for t in after for x in t.tolist()],
        "loss": step.loss,
        "grad_norm": step.grad_norm,
        "entropy": step.metrics.get("entropy", math.nan),
        "seconds": time.perf_counter() - t0,
    }


def run_export(args: argparse.Namespace) -> dict:
    from minpro_megatron.convert.hf_io import HFCheckpoint
    from minpro_megatron.weights.export import HFExporter

    import torch.distributed as dist

    t0 = time.perf_counter()
    cfg, learner = _learner(args.hf_dir, "float32", args.impl)
    exporter = HFExporter(learner.model, cfg.model)
    ckpt = HFCheckpoint(args.hf_dir)
    worst, names, nbytes = 0.0, 0, 0
    for bucket in exporter.buckets(bucket_bytes=8 << 20):
        for name, tensor in bucket:
            ref = ckpt.get(name, tuple(tensor.shape))
            worst = max(worst, float((tensor.detach().float().cpu() - ref.float()).abs().max()))
            names += 1
            nbytes += tensor.numel() * tensor.element_size()
    return {
        "backend": str(dist.get_backend()),
        "device": str(learner.device),
        "tensors": names,
        "expected_tensors": len(ckpt.names()),
        "bytes": nbytes,
        "max_abs_diff": worst,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.gpucheck.worker")
    ap.add_argument("what", choices=["learner", "export"])
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impl", default="local", choices=["local", "transformer_engine"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("error: --device cpu needs CUDA hidden (CUDA_VISIBLE_DEVICES='') so the CPU path is used")
    result = run_learner(args) if args.what == "learner" else run_export(args)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)
    from minpro_megatron.learner.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

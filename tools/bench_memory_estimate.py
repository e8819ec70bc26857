#!/usr/bin/env python
"""Check the Slurm planner's per-GPU learner memory estimate (minpro_megatron/slurm/memory.py) against what
the learner really allocates on the CPU, per component and layout, for the tiny MoE of
examples/tiny_moe_cpu.yaml and a ~100M-parameter MoE.

Measured on every rank after one ``Learner.train_step`` (so Adam's state exists):
- parameters: bytes of the model's parameter tensors;
- gradients: bytes of DDP's gradient buffers (the fp32 main grads, incl. their bucket padding);
- optimizer: bytes of the optimizer state (Adam m and v) plus any master copy not backed by the model;
- activations: bytes of the tensors autograd saves for the backward during the next train_step (distinct
  storages, parameters excluded; autograd's saved-tensor hooks), against the estimate's activations for
  the local layer spec (the one the CPU learner builds);
- peak: the high-water mark of torch's CPU allocator during that step's forward + backward (profiler
  memory events, allocations minus frees): saved activations plus the backward's transients, against the
  estimate's activations + logits (the chunked log-prob kernel's transient, reached at the start of the
  backward). The worst rank is reported.

    python tools/bench_memory_estimate.py [--models tiny,moe100m] [--layouts 1,tp2,ep2]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_common import quiet_native_stderr, report  # noqa: E402
from bench_learner_overhead import LAYOUTS, launch  # noqa: E402

TOLERANCE = 0.15
# name -> (model overrides on examples/tiny_moe_cpu.yaml, samples per DP rank, tokens per sample)
MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": ({}, 32, 32),
    "moe100m": (dict(num_layers=6, hidden_size=512, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                     vocab_size=32000, max_position_embeddings=256, num_experts=16, moe_router_topk=2,
                     moe_ffn_hidden_size=448), 8, 128),
}
COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "peak")


def run_config(model: str, layout: str):
    from minpro_megatron.config import ParallelConfig, load_config
    from minpro_megatron.losses import LossConfig

    overrides, samples, length = MODELS[model]
    cfg = load_config(REPO / "examples" / "tiny_moe_cpu.yaml")
    for k, v in overrides.items():
        setattr(cfg.model, k, v)
    cfg.parallel = ParallelConfig(**LAYOUTS[layout])
    cfg.loss = LossConfig(name="minpro")
    cfg.train.micro_batch_size = samples
    cfg.slurm.memory.seq_len = length
    return cfg


def batch(cfg, samples: int, length: int, seed: int) -> list:
    from minpro_megatron.learner.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    vocab = cfg.model.vocab_size
    return [TrainSample(torch.randint(0, vocab, (length,), generator=g), length // 4,
                        -math.log(vocab) + 0.3 * torch.randn(length - length // 4, generator=g),
                        float(torch.randn(1, generator=g))) for _ in range(samples)]


def measure(models: list[str], layouts: list[str]) -> dict:
    """On every rank: per model and layout, build a Learner, step once, then measure (bytes)."""
    from megatron.core import parallel_state as ps
    from torch.profiler import ProfilerActivity, profile

    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner

    out = {}
    for model in models:
        for layout in layouts:
            cfg = run_config(model, layout)
            _, samples, length = MODELS[model]
            init_distributed(cfg.parallel, seed=1234)
            learner = Learner(cfg)
            learner.train_step(batch(cfg, samples, length, seed=0))
            params = {id(p): p for m in learner.model for p in m.parameters()}
            storages = {p.untyped_storage().data_ptr() for p in params.values()}
            grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                        for m in learner.model for b in [*m.buffers, *m.expert_parallel_buffers])
            opt_bytes = 0
            for opt in getattr(learner.optimizer, "chained_optimizers", [learner.optimizer]):
                inner = opt.optimizer
                for state in inner.state.values():
                    opt_bytes += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
                for group in inner.param_groups:  # master copies: optimizer params not backed by the model
                    opt_bytes += sum(p.numel() * p.element_size() for p in group["params"]
                                     if p.untyped_storage().data_ptr() not in storages)
            peak = {}
            run_schedule = learner._run_schedule

            def profiled(*a, **k):
                with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    res = run_schedule(*a, **k)
                events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                                key=lambda e: e.start_ns())
                cur = hi = 0
                for e in events:
                    cur += e.nbytes()
                    hi = max(hi, cur)
                peak["bytes"] = hi
                return res

            saved: dict[int, int] = {}  # storage -> bytes of every tensor autograd keeps for the backward

            def pack(t: torch.Tensor) -> torch.Tensor:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in storages:
                    saved[ptr] = t.untyped_storage().nbytes()
                return t

            learner._run_schedule = profiled
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                learner.train_step(batch(cfg, samples, length, seed=1))
            out[(model, layout)] = {
                "parameters": sum(p.numel() * p.element_size() for p in params.values()),
                "param_count": sum(p.numel() for p in params.values()),
                "gradients": grads, "optimizer": opt_bytes, "activations": sum(saved.values()), "peak": peak["bytes"],
            }
            del learner
            ps.destroy_model_parallel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,moe100m")
    ap.add_argument("--layouts", default="1,tp2,ep2")
    args = ap.parse_args()
    from minpro_megatron.slurm.memory import estimate_learner_memory

    models, layouts = args.models.split(","), args.layouts.split(",")
    measured: dict = {}
    for world, names in ((1, [n for n in layouts if n == "1"]), (2, [n for n in layouts if n != "1"])):
        if names:
            ranks = launch(measure, world, models, names, timeout=900)
            for key in ranks[0]:
                measured[key] = {c: max(r[key][c] for r in ranks) for c in ranks[0][key]}

    print("\n## Learner memory per rank: estimate (slurm/memory.py) vs measured on the CPU (MiB)\n")
    print("| model | layout | params/rank est | measured | " + " | ".join(f"{c} est | measured | ratio" for c in COMPONENTS) + " |")
    print("|---|---|---:|---:|" + "---:|---:|---:|" * len(COMPONENTS))
    rows = []
    for (model, layout), got in measured.items():
        cfg = run_config(model, layout)
        world = 1 if layout == "1" else 2
        est = estimate_learner_memory(cfg, world, transformer_impl="local")  # the CPU learner's layer spec
        want = {"parameters": est.parameters, "gradients": est.gradients, "optimizer": est.optimizer,
                "activations": est.activations, "peak": est.activations + est.logits}
        ratios = {c: want[c] / got[c] for c in COMPONENTS}
        print(f"| {model} | {layout} | {est.params_per_gpu} | {got['param_count']} | "
              + " | ".join(f"{want[c] / 2**20:.2f} | {got[c] / 2**20:.2f} | {ratios[c]:.2f}" for c in COMPONENTS) + " |")
        rows.append((model, layout, est, got, ratios))
    print()
    for model, layout, est, got, ratios in rows:
        cfg = run_config(model, layout)
        tokens = cfg.train.micro_batch_size * cfg.slurm.memory.seq_len / cfg.parallel.context
        setting = f"{model} ({got['param_count'] / 1e6:.2f}M params/rank), {'1 rank' if layout == '1' else layout.upper()}"
        text = ", ".join(f"{c} {ratios[c]:.2f}x" for c in COMPONENTS)
        ok = all(abs(r - 1) <= TOLERANCE for r in ratios.values())
        note = ""
        if abs(ratios["activations"] - 1) > TOLERANCE:
            per = got["activations"] / tokens / cfg.model.num_layers
            formula = est.activations / tokens / cfg.model.num_layers
            note = (f"activations: measured {per / 1024:.1f} KiB per token and layer saved for the backward vs the "
                    f"local-spec formula's {formula / 1024:.1f} KiB (slurm/memory.py local_activation_terms)")
        if abs(ratios["peak"] - 1) > TOLERANCE:
            note += ("; " if note else "") + (
                f"peak: measured {(got['peak'] - got['activations']) / 2**20:.2f} MiB above the saved activations vs "
                f"the log-prob transient's {est.logits / 2**20:.2f} MiB")
        report("bench_memory_estimate", setting, f"estimate / measured: {text}", "each within 0.85-1.15x", ok, note)

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The cost of quantized rollouts (weights/quantize.py): per-tensor quantization error, the train-inference
log-prob gap they cause, and the bytes each weight sync moves.

    python tools/bench_quant_mismatch.py --hf /ckpt/tiny-hf            # a warm-started tiny MoE (HF directory)
    python tools/bench_quant_mismatch.py                               # random tiny MoE (examples/tiny_moe_cpu.yaml)

The learner is the HF model in fp32. The rollout policy of a format is the same model holding the
quantize->dequantize weights (rollout.quantization_mode=dequantized): exactly what an SGLang CPU server
serves after the sync (tests/quant/test_quantized_sglang.py: server vs this model <= 1e-4, measured ~1e-6),
so a forward of it stands in for the server here. Responses are sampled from the rollout policy
(arithmetic prompts, temperature 1); delta_t = log pi_learner - log pi_rollout per response token;
reported as the trainer's mismatch/* metrics (losses/mismatch.py): mean and max |delta|, k3 estimate of
KL(rollout || learner). ``--weights-dtype bfloat16`` also rounds every weight to bf16 (the bf16 server's
weights; the forward stays fp32, so bf16 activation rounding is not included).

Bytes per sync: the real-format tensors (rollout.quantization_mode=real) of this model and, from its
config alone, of examples/qwen3_30b_a3b_h100.yaml, against bf16 weights.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ("none", "fp8", "int4_w4a16")


def _kind(name: str) -> str:
    for key, kind in (("q_proj", "attn q/k/v"), ("k_proj", "attn q/k/v"), ("v_proj", "attn q/k/v"), ("o_proj", "attn o"),
                      ("gate_proj", "mlp gate/up"), ("up_proj", "mlp gate/up"), ("down_proj", "mlp down")):
        if f".{key}." in name:
            return kind
    return "other"


def quantizer(fmt: str, group: int, dtype: torch.dtype, dequantize: bool):
    from minpro_megatron.weights.quantize import RolloutQuantizer

    return None if fmt == "none" else RolloutQuantizer(fmt=fmt, dequantize=dequantize, out_dtype=dtype, group_size=group)


def tensor_errors(state: dict[str, torch.Tensor], fmt: str, group: int) -> dict[str, list[tuple[float, float]]]:
    """kind -> [(||w - dq|| / ||w||, max|w - dq| / max|w|) per quantized tensor] (fp32 dequantization)."""
    q = quantizer(fmt, group, torch.float32, dequantize=True)
    dq = dict(q.apply(state.items()))
    out: dict[str, list[tuple[float, float]]] = {}
    for n, w in state.items():
        if q.quantizes(n, w):
            e = (w.float() - dq[n].float())
            out.setdefault(_kind(n), []).append((float(e.norm() / w.float().norm()), float(e.abs().max() / w.float().abs().max())))
    return out


def load_model(path: Path, state: dict[str, torch.Tensor] | None, weights_dtype: torch.dtype):
    """The HF model at ``path``, optionally with ``state`` (checkpoint names) loaded, weights rounded to
    ``weights_dtype`` and held in fp32."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    from minpro_megatron.convert.hf_io import write_safetensors_shards
    from minpro_megatron.convert.buckets import iter_buckets

    if state is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:  # through a checkpoint directory: transformers converts checkpoint names (per-expert) itself
        with tempfile.TemporaryDirectory() as tmp:
            write_safetensors_shards(iter_buckets(state.items(), 1 << 40), tmp)
            shutil.copy(path / "config.json", Path(tmp) / "config.json")
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    if weights_dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(weights_dtype).float())
    return model.eval()


@torch.no_grad()
def response_logps(model, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    logits = model(input_ids=seqs).logits.float()[:, prompt_len - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, seqs[:, prompt_len:, None])[..., 0].double()


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new: int, temperature: float, eos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling (teacher-forced log-probs are recomputed afterwards); returns (sequences, mask)."""
    g = torch.Generator().manual_seed(seed)
    seqs = prompts.clone()
    alive = torch.ones(len(prompts), dtype=torch.bool)
    mask = []
    for _ in range(max_new):
        logits = model(input_ids=seqs).logits.float()[:, -1] / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
        mask.append(alive.clone())
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        alive &= nxt != eos
    return seqs, torch.stack(mask, 1)


_DIST = None


@torch.no_grad()
def megatron_logps(path: Path, fmt: str, group: int, server_dtype: torch.dtype, seqs: torch.Tensor, prompt_len: int,
                   batch: int = 128) -> torch.Tensor:
    """Response log-probs of the Megatron learner (fp32, 1 process) built from ``path``, with learner-side
    fake quantization in ``fmt`` (train.fake_quant, weights/fake_quant.py; none: without) for servers
    of ``server_dtype``: the learner the trainer runs, scoring the rollout's samples."""
    global _DIST
    from minpro_megatron.config import ParallelConfig, RunConfig
    from minpro_megatron.config.hf_model import model_config_from_hf
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.logprobs import prepare_packed_inputs
    from minpro_megatron.learner.model_provider import build_model_chunks
    from minpro_megatron.parallel.cp_layout import ZigzagLayout
    from minpro_megatron.weights.fake_quant import FakeQuant

    cfg = RunConfig(model=model_config_from_hf(path), parallel=ParallelConfig())
    cfg.rollout.quantization = cfg.train.fake_quant = fmt
    cfg.rollout.server_dtype = str(server_dtype).removeprefix("torch.")
    cfg.rollout.quantization_group_size = group
    if _DIST is None:
        _DIST = init_distributed(cfg.parallel, seed=0)
    (model,) = build_model_chunks(cfg.model, cfg.parallel)
    load_hf_weights([model], cfg.model, path)
    fq = FakeQuant.from_config([model], cfg)
    model.eval()
    out = []
    for rows in seqs.split(batch):
        layout = ZigzagLayout(torch.tensor([rows.shape[1]] * len(rows)))
        inputs = prepare_packed_inputs(list(rows), layout)
        logits = model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=None,
                       packed_seq_params=inputs.packed_seq_params)
        logits = layout.unpad(logits[0]).float()[:, : cfg.model.vocab_size].reshape(len(rows), rows.shape[1], -1)
        lp = torch.log_softmax(logits[:, prompt_len - 1 : -1], -1)
        out.append(lp.gather(-1, rows[:, prompt_len:, None])[..., 0].double())
    if fq is not None:
        fq.detach()
    return torch.cat(out)


def mismatch(learner_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    d = (learner_lp - rollout_lp)[mask]
    return {"abs_delta_mean": float(d.abs().mean()), "abs_delta_max": float(d.abs().max()),
            "kl_k3": float((torch.expm1(d) - d).mean()), "tokens": int(d.numel())}


def sync_bytes(shapes: dict[str, tuple[int, ...]], fmt: str, group: int) -> int:
    """Bytes of the real-format tensors for HF tensors {name: shape} (bf16 for unquantized ones)."""
    q = quantizer(fmt, group, torch.bfloat16, dequantize=False)
    total = 0
    for n, shape in shapes.items():
        numel = math.prod(shape)
        if q is None or not q.quantizes(n, torch.empty(shape, device="meta")):
            total += 2 * numel
        elif fmt == "fp8":
            total += numel + 4
        else:
            total += numel // 2 + 2 * shape[0] * (shape[1] // group) + 16
    return total


def model_shapes(yaml_path: Path) -> dict[str, tuple[int, ...]]:
    from minpro_megatron.config import load_config
    from minpro_megatron.convert.mapping import param_maps

    model = load_config(yaml_path).model
    return {n: tuple(s) for pm in param_maps(model) if pm.export for n, s in zip(pm.hf, pm.hf_shapes)}


def random_tiny(out: Path) -> Path:
    """A random tiny MoE of examples/tiny_moe_cpu.yaml's shape as an HF directory."""
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir

    make_tiny_model_dir(out, kind="qwen3_moe", seed=1, dtype="float32", hidden_size=128, num_heads=4, num_kv_heads=2,
                        head_dim=32, num_experts=4, top_k=2, moe_intermediate_size=128, intermediate_size=256,
                        initializer_range=0.02)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, default=None, help="HF directory of the policy (default: a random tiny MoE)")
    p.add_argument("--prompts", type=int, default=256, help="arithmetic prompts")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--group-size", type=int, default=128, help="int4_w4a16 group size (rollout.quantization_group_size)")
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--big", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "qwen3_30b_a3b_h100.yaml",
                   help="a config whose model's bytes per sync are computed from its shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    import tempfile

    from transformers import AutoTokenizer

    from minpro_megatron.models.tiny_hf import read_checkpoint_dir

    tmp = tempfile.TemporaryDirectory()
    path = args.hf or random_tiny(Path(tmp.name) / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    state = {n: t.float() for n, t in read_checkpoint_dir(path).items()}
    wdtype = getattr(torch, args.weights_dtype)
    rng = random.Random(args.seed)
    texts = [f"{rng.randrange(100):02d}+{rng.randrange(100):02d}=" for _ in range(args.prompts)]
    prompts = torch.tensor([[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in texts])
    prompts = prompts.repeat_interleave(args.samples, 0)
    learner = load_model(path, None, torch.float32)

    print(f"# quantized rollouts: {path if args.hf else 'random tiny MoE'}; {len(prompts)} samples, "
          f"T={args.temperature}, {args.max_new_tokens} new tokens, int4 group {args.group_size}, rollout weights {args.weights_dtype}\n")
    print("## per-tensor quantization error (quantized tensors; ||w-dq||/||w|| and max|w-dq|/max|w|: mean / max over tensors)\n")
    print("| format | tensors | rel. Frobenius mean | rel. Frobenius max | max-err/amax mean | max-err/amax max |")
    print("|---|---|---|---|---|---|")
    per_kind = {}
    for fmt in FORMATS[1:]:
        errs = tensor_errors(state, fmt, args.group_size)
        per_kind[fmt] = errs
        flat = [e for v in errs.values() for e in v]
        fro, mx = [e[0] for e in flat], [e[1] for e in flat]
        print(f"| {fmt} | {len(flat)} | {sum(fro) / len(fro):.4f} | {max(fro):.4f} | {sum(mx) / len(mx):.4f} | {max(mx):.4f} |")
    print("\nby tensor kind (rel. Frobenius mean):\n")
    kinds = sorted({k for e in per_kind.values() for k in e})
    print("| format | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for fmt, errs in per_kind.items():
        print(f"| {fmt} | " + " | ".join(f"{sum(e[0] for e in errs[k]) / len(errs[k]):.4f}" for k in kinds) + " |")

    print(f"\n## train-inference log-prob gap (learner fp32 vs rollout policy; tokens sampled from the rollout policy)\n")
    print("| format | tokens | mean abs delta | max abs delta | k3 KL(rollout‖learner) | seconds |")
    print("|---|---|---|---|---|---|")
    for fmt in FORMATS:
        t0 = time.perf_counter()
        q = quantizer(fmt, args.group_size, torch.float32, dequantize=True)
        rollout = load_model(path, dict(q.apply(state.items())) if q else state, wdtype)
        seqs, mask = sample(rollout, prompts, args.max_new_tokens, args.temperature, tok.eos_token_id, args.seed)
        m = mismatch(response_logps(learner, seqs, prompts.shape[1]), response_logps(rollout, seqs, prompts.shape[1]), mask)
        print(f"| {fmt} | {m['tokens']} | {m['abs_delta_mean']:.3e} | {m['abs_delta_max']:.3e} | {m['kl_k3']:.3e} | "
              f"{time.perf_counter() - t0:.1f} |")

    print("\n## with learner-side fake quantization (train.fake_quant): the Megatron learner (fp32) scores the same "
          "rollout samples\n")
    print("| rollout weights | learner | tokens | mean abs delta | max abs delta | k3 KL(rollout‖learner) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for fmt in FORMATS:
        q = quantizer(fmt, args.group_size, wdtype, dequantize=True)
        rollout = load_model(path, dict(q.apply(state.items())) if q else state, wdtype)
        seqs, mask = sample(rollout, prompts, args.max_new_tokens, args.temperature, tok.eos_token_id, args.seed)
        rollout_lp = response_logps(rollout, seqs, prompts.shape[1])
        for fq in (("none", fmt) if fmt != "none" else ("none",)):
            t0 = time.perf_counter()
            m = mismatch(megatron_logps(path, fq, args.group_size, wdtype, seqs, prompts.shape[1]), rollout_lp, mask)
            label = "Megatron, no fake quant" if fq == "none" else f"Megatron, train.fake_quant={fq}"
            print(f"| {fmt} | {label} | {m['tokens']} | {m['abs_delta_mean']:.3e} | {m['abs_delta_max']:.3e} | "
                  f"{m['kl_k3']:.3e} | {time.perf_counter() - t0:.1f} |")

    print("\n## bytes per weight sync (real format; unquantized tensors in bf16)\n")
    print("| model | none (bf16) | fp8 | int4_w4a16 | fp8 / none | int4 / none |")
    print("|---|---|---|---|---|---|")
    rows = [("this model", {n: tuple(t.shape) for n, t in state.items()})]
    if args.big.is_file():
        rows.append((args.big.stem, model_shapes(args.big)))
    for label, shapes in rows:
        b = {fmt: sync_bytes(shapes, fmt, args.group_size) for fmt in FORMATS}
        # the real-format buckets of this model, measured, must equal the formula
        if label == "this model":
            for fmt in FORMATS[1:]:
                real = quantizer(fmt, args.group_size, torch.bfloat16, dequantize=False).apply(
                    (n, t.to(torch.bfloat16)) for n, t in state.items())
                assert sum(t.numel() * t.element_size() for _, t in real) == b[fmt], fmt
        print(f"| {label} | {b['none'] / 1e6:.3f} MB | {b['fp8'] / 1e6:.3f} MB | {b['int4_w4a16'] / 1e6:.3f} MB | "
              f"{b['fp8'] / b['none']:.3f} | {b['int4_w4a16'] / b['none']:.3f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

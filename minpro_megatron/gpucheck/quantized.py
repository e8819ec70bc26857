"""Part e of the GPU check: quantized rollouts (rollout.quantization=fp8, weights/quantize.py) served by SGLang.

On a GPU (``real`` mode): an SGLang server boots from a *real* fp8 export of policy A (float8_e4m3fn weights +
one fp32 ``weight_scale`` per tensor, config.json ``quantization_config = {"quant_method": "fp8",
"activation_scheme": "dynamic", "ignored_layers": [...]}``: SGLang's fp8 loader, bf16 activations quantized
per token at run time), answers the probe, then receives policy B as fp8 buckets (weights + scales, the
flattened-bucket distributed transport over NCCL) into layers whose fp8 weights SGLang already transformed
after loading. On the CPU (``dequantized`` mode, the rehearsal): the same flow with quantize->dequantize
fp32 weights in a CPU server (SGLang has no CPU fp8 kernels).

What it compares (greedy probe of 8 tokens after "12+34=", log-probs of every position):
  boot   server(A export) vs a transformers fp32 model holding A's dequantized weights;
  sync   server after the sync vs the same for B (the learner's policy as the servers should serve it);
  stale  server after the sync vs A's reference: must be well above ``sync`` (the push really landed);
  learner  server vs B unquantized, reported only: the train-inference mismatch the format costs.
and reports the bytes the sync moved next to what bf16 weights would have moved.

Tolerances: dequantized mode 1e-4 (fp32 server and reference multiply the same weights; measured 1e-6 in
tests/quant/test_quantized_sglang.py). Real fp8 mode 0.15: the server computes in bf16 (part a's bf16
learner needs 0.1 on this tiny model's log-probs) and also rounds every GEMM input to e4m3 per token
(3 mantissa bits, relative error up to 2^-4 per element, averaging over 64-128-wide dot products to ~1%
of a logit), which the fp32 reference does not; the stale gap of two random policies is O(1).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from minpro_megatron.gpucheck.report import CheckResult, Status

__all__ = [
    "DEQUANTIZED_LOGP_ATOL",
    "FP8_REAL_LOGP_ATOL",
    "ProbeGaps",
    "named_nbytes",
    "probe_result",
    "quantized_export",
    "run_part",
]

DEQUANTIZED_LOGP_ATOL = 1e-4
FP8_REAL_LOGP_ATOL = 0.15
MIN_GPU_CAPABILITY = 89  # SGLang's fp8 GEMMs (Ada / Hopper and newer)
TINY = dict(kind="qwen3_moe", initializer_range=0.125, dtype="float32", num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, num_experts=8, top_k=2, moe_intermediate_size=64)


@dataclass(frozen=True)
class ProbeGaps:
    """max |d log-prob| of the server's greedy probe against each reference."""

    boot: float  # booted from A's export vs A dequantized
    sync: float  # after the sync vs B dequantized
    stale: float  # after the sync vs A dequantized
    learner: float  # after the sync vs B unquantized (reported)


def named_nbytes(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def probe_result(name: str, mode: str, gaps: ProbeGaps, atol: float, sent_bytes: int, bf16_bytes: int,
                 fp8_bytes: int, seconds: float = 0.0) -> CheckResult:
    """PASS when the booted and the synced server match their dequantized references within ``atol`` and the
    sync visibly moved the server (stale gap above max(2 x sync gap, atol)); the figure states the bytes."""
    values = [gaps.boot, gaps.sync, gaps.stale, gaps.learner]
    finite = all(v == v and v != float("inf") for v in values)
    landed = gaps.stale > max(2 * gaps.sync, atol)
    ok = finite and gaps.boot <= atol and gaps.sync <= atol and landed
    figure = (f"{mode}: probe vs dequantized reference boot {gaps.boot:.3g}, after sync {gaps.sync:.3g} (atol {atol:g}); "
              f"vs previous policy {gaps.stale:.3g}{'' if landed else ' (sync did not land)'}; vs learner unquantized "
              f"{gaps.learner:.3g}; sync {sent_bytes / 2**20:.3f} MiB sent, fp8 format {fp8_bytes / 2**20:.3f} MiB = "
              f"{fp8_bytes / bf16_bytes:.3f}x bf16 ({bf16_bytes / 2**20:.3f} MiB)")
    res = CheckResult(name, Status.PASS if ok else Status.FAIL, figure, seconds=seconds)
    res.values.update(boot_max_abs=gaps.boot, sync_max_abs=gaps.sync, stale_max_abs=gaps.stale,
                      learner_max_abs=gaps.learner, sent_bytes=float(sent_bytes), bf16_bytes=float(bf16_bytes),
                      fp8_bytes=float(fp8_bytes), fp8_over_bf16=fp8_bytes / bf16_bytes)
    return res


def quantized_export(named: Sequence[tuple[str, torch.Tensor]], quantizer, template: Path, out: Path) -> Path:
    """An HF directory the servers boot from: ``quantizer``'s tensors of ``named`` (full HF state dict), the
    template's config.json with torch_dtype = the server dtype and, in real mode, the quantization_config
    SGLang's loader reads (as rollout/sglang_engine.py writes its initial export), the template's tokenizer."""
    from minpro_megatron.convert.buckets import iter_buckets
    from minpro_megatron.convert.hf_io import write_safetensors_shards

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_safetensors_shards(iter_buckets(quantizer.apply(named), 1 << 30), out)
    cfg = json.loads((template / "config.json").read_text())
    cfg["torch_dtype"] = str(quantizer.out_dtype).removeprefix("torch.")
    qcfg = quantizer.hf_quantization_config({n: tuple(t.shape) for n, t in named})
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in template.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return out


def run_part(ctx) -> list[CheckResult]:
    """``ctx`` a parts.CheckContext."""
    name = "e  fp8 rollouts: SGLang booted from a quantized export, quantized buckets synced + probe"
    real = ctx.device == "cuda"
    if not ctx.env.has("sglang"):
        return [CheckResult(name, Status.SKIP, f"sglang not importable ({ctx.env.packages.get('sglang')})")]
    try:
        import modelopt.torch.quantization  # noqa: F401  (weights/quantize.py's quantizer)
    except Exception as exc:  # noqa: BLE001 - any import failure means the part cannot run
        return [CheckResult(name, Status.SKIP, f"nvidia-modelopt not importable ({type(exc).__name__}: {exc})")]
    if real and int(ctx.env.capability or 0) < MIN_GPU_CAPABILITY:
        return [CheckResult(name, Status.SKIP, f"SGLang's fp8 kernels need sm_{MIN_GPU_CAPABILITY}+, this GPU is sm_{ctx.env.capability}")]
    return [_serve_and_sync(ctx, name, real)]


def _serve_and_sync(ctx, name: str, real: bool) -> CheckResult:
    from transformers import AutoModelForCausalLM

    from minpro_megatron.convert.buckets import iter_buckets
    from minpro_megatron.models.tiny_hf import checkpoint_state_dict, make_tiny_model_dir
    from minpro_megatron.serving.server import ServerLaunchSpec, SGLangServer
    from minpro_megatron.weights.quantize import RolloutQuantizer
    from minpro_megatron.weights.sync import WeightSync
    from minpro_megatron.weights.transports import DistributedTransport
    from minpro_megatron.weights.verify import LogprobProbe, hf_logprob_reference, server_probe_logprobs

    t0 = time.perf_counter()
    root = ctx.work_dir / "quantized"
    hidden = 64 if ctx.small else 128
    model_a, tok, dir_a = make_tiny_model_dir(root / "A", seed=1, hidden_size=hidden, **TINY)
    model_b, _, dir_b = make_tiny_model_dir(root / "B", seed=2, hidden_size=hidden, **TINY)
    server_dtype = torch.bfloat16 if real else torch.float32
    mode = "real fp8" if real else "dequantized fp8"
    served = RolloutQuantizer(fmt="fp8", dequantize=not real, out_dtype=server_dtype)
    dequant = RolloutQuantizer(fmt="fp8", dequantize=True, out_dtype=server_dtype)
    named_a = sorted(checkpoint_state_dict(model_a).items())
    named_b = sorted(checkpoint_state_dict(model_b).items())
    boot_dir = quantized_export(named_a, served, Path(dir_a), root / "A_export")

    def reference(named, label: str):
        d = quantized_export(named, dequant, Path(dir_a), root / f"{label}_dequantized")
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(ctx.device).eval()

    ref_a, ref_b = reference(named_a, "A"), reference(named_b, "B")
    learner_b = model_b.to(ctx.device).eval()
    prompt = tok("12+34=").input_ids
    atol = FP8_REAL_LOGP_ATOL if real else DEQUANTIZED_LOGP_ATOL

    def gap(url: str, model) -> float:
        tokens, got = server_probe_logprobs(url, prompt, 8)
        want = hf_logprob_reference(model, ctx.device)(tokens)
        return max(abs(a - b) for a, b in zip(got, want))

    pushed_b = [(n, t.to(ctx.device)) for n, t in served.apply(named_b)]
    bf16_bytes = sum(t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size() for _, t in named_b)
    fp8_bytes = named_nbytes(RolloutQuantizer(fmt="fp8", dequantize=False, out_dtype=torch.bfloat16).apply(named_b))
    dtype_name = "bfloat16" if real else "float32"
    server = SGLangServer(ServerLaunchSpec(model_path=str(boot_dir), device=ctx.device, dtype=dtype_name),
                          ctx.work_dir / "sglang_quantized.log")
    server.start()
    try:
        server.wait_ready()
        boot = gap(server.url, ref_a)
        sync = WeightSync([server.url], DistributedTransport(), probe=LogprobProbe(prompt, threshold=None))
        try:  # small buckets: fp8 weights, fp32 scales and high-precision tensors mixed in one bucket
            result = sync.sync(iter_buckets(pushed_b, 64 << 10), step=1, reference=hf_logprob_reference(ref_b, ctx.device))
        finally:
            sync.close()
        assert result.probe is not None
        gaps = ProbeGaps(boot=boot, sync=result.probe.max_abs_diff, stale=gap(server.url, ref_a),
                         learner=gap(server.url, learner_b))
    finally:
        server.stop()
    res = probe_result(name, mode, gaps, atol, result.bytes, bf16_bytes, fp8_bytes, seconds=time.perf_counter() - t0)
    res.figure += f"; {result.buckets} buckets in {result.transfer_seconds:.3f} s"
    res.values.update(buckets=float(result.buckets), transfer_seconds=result.transfer_seconds)
    return res

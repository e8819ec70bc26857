"""The parts of the GPU check. Each returns CheckResults; a part that raises is reported as FAIL by the
caller. Every part also runs on the CPU at small sizes (``device='cpu'``), which is how CI tests the
comparison logic end to end.

a  learner: a tiny Qwen3-MoE from a Hugging Face directory; one MinPRO train step on the device in fp32
   and bf16 (local spec; TransformerEngine spec too when TE imports) against the fp32 CPU reference.
b  export: the streaming HF exporter over the device's process group (NCCL on GPU) returns the loaded
   weights bit for bit; pushing them into an SGLang server on the device (distributed transport + probe)
   needs SGLang with its CUDA kernels.
c  colocated tensor transport into a server on the same GPU (needs SGLang with CUDA).
d  chunked vocabulary log-probs vs the naive [T, V] log_softmax: values and peak memory.
e  quantized rollouts (gpucheck/quantized.py): an SGLang server boots from a real fp8 export and receives fp8
   buckets (GPU); on the CPU the same flow in dequantized mode.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minpro_megatron.gpucheck.environment import Environment
from minpro_megatron.gpucheck.report import CheckResult, Status, compare

__all__ = ["CheckContext", "PARTS", "part_learner", "part_export", "part_tensor_transport", "part_logprobs", "part_quantized"]

# Tolerances, with the reason for each.
# fp32 on the device vs fp32 on the CPU: same math, different kernels and summation order (TF32 off).
FP32_LOGP_ATOL = 1e-4
FP32_SCALAR_RTOL = 1e-4
# After one Adam step (eps 1e-3, lr 1e-3): the update is a smooth function of the gradient, so the
# step's rounding differences stay O(1e-6) in the parameters and O(1e-4) in the log-probs.
FP32_AFTER_ATOL = 1e-3
# bf16 weights and activations (8 mantissa bits, relative rounding 2^-9 per op) through 2 layers, the
# router in fp32: log-probs of a near-uniform 32-way policy (|logp| ~ 3.5) move by a few 1e-2.
BF16_LOGP_ATOL = 0.1
BF16_SCALAR_RTOL = 0.05


@dataclass
class CheckContext:
    device: str  # "cuda" or "cpu"
    work_dir: Path
    env: Environment
    small: bool = False  # CPU-test sizes
    python: str = sys.executable
    timeout_s: float = 600.0

    def worker(self, what: str, out_name: str, *, device: str, **flags: str) -> dict:
        """Run gpucheck.worker in a fresh interpreter; CUDA hidden for device='cpu'."""
        out = self.work_dir / out_name
        cmd = [self.python, "-m", "minpro_megatron.gpucheck.worker", what, "--device", device, "--out", str(out)]
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        log = self.work_dir / (out_name + ".log")
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=self.timeout_s)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"worker {what} ({device}, {flags}) exited {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())


def tiny_hf_dir(ctx: CheckContext) -> str:
    """A tiny random Qwen3-MoE (fp32 safetensors + character tokenizer), made once per run."""
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir

    path = ctx.work_dir / "tiny_qwen3_moe"
    if not (path / "config.json").is_file():
        make_tiny_model_dir(
            path, "qwen3_moe", seed=3, dtype="float32", hidden_size=64 if ctx.small else 128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, moe_intermediate_size=64,
            initializer_range=0.02,
        )
    return str(path)


def _learner_comparisons(run: dict, ref: dict, bf16: bool) -> dict:
    logp_atol = BF16_LOGP_ATOL if bf16 else FP32_LOGP_ATOL
    rtol = BF16_SCALAR_RTOL if bf16 else FP32_SCALAR_RTOL
    after_atol = BF16_LOGP_ATOL if bf16 else FP32_AFTER_ATOL
    return {
        "logp": compare(run["logp_before"], ref["logp_before"], atol=logp_atol),
        "loss": compare(run["loss"], ref["loss"], atol=0.0, rtol=rtol),
        "grad_norm": compare(run["grad_norm"], ref["grad_norm"], atol=0.0, rtol=rtol),
        "logp_after_step": compare(run["logp_after"], ref["logp_after"], atol=after_atol),
    }


def part_learner(ctx: CheckContext) -> list[CheckResult]:
    hf = tiny_hf_dir(ctx)
    t0 = time.perf_counter()
    ref = ctx.worker("learner", "learner_cpu_fp32.json", device="cpu", hf_dir=hf, dtype="float32", impl="local")
    results = [CheckResult("a0 CPU fp32 reference", Status.PASS,
                           f"loss {ref['loss']:.6g}, grad norm {ref['grad_norm']:.6g}", seconds=time.perf_counter() - t0)]
    impls = ["local"]
    if ctx.device == "cuda":
        impls.append("transformer_engine")
    for impl in impls:
        for dtype in ("float32", "bfloat16"):
            name = f"a {impl} {('fp32' if dtype == 'float32' else 'bf16')} on {ctx.device} vs CPU fp32"
            if impl == "transformer_engine" and not ctx.env.has("transformer_engine"):
                results.append(CheckResult(name, Status.SKIP, f"transformer_engine not importable ({ctx.env.packages.get('transformer_engine')})"))
                continue
            t0 = time.perf_counter()
            run = ctx.worker("learner", f"learner_{ctx.device}_{impl}_{dtype}.json", device=ctx.device, hf_dir=hf,
                             dtype=dtype, impl=impl)
            res = CheckResult.from_comparisons(name, _learner_comparisons(run, ref, dtype == "bfloat16"),
                                               seconds=time.perf_counter() - t0)
            res.values.update(loss=run["loss"], grad_norm=run["grad_norm"], ref_loss=ref["loss"], ref_grad_norm=ref["grad_norm"])
            results.append(res)
    return results


def part_export(ctx: CheckContext) -> list[CheckResult]:
    hf = tiny_hf_dir(ctx)
    t0 = time.perf_counter()
    run = ctx.worker("export", f"export_{ctx.device}.json", device=ctx.device, hf_dir=hf, impl="local")
    ok = run["max_abs_diff"] == 0.0 and run["tensors"] == run["expected_tensors"]
    results = [CheckResult(
        f"b1 exporter over {run['backend']} returns the loaded weights", Status.PASS if ok else Status.FAIL,
        f"{run['tensors']}/{run['expected_tensors']} tensors, {run['bytes'] / 2**20:.1f} MiB, max|d|={run['max_abs_diff']:g}",
        seconds=time.perf_counter() - t0,
    )]
    name = "b2 distributed transport into an SGLang server + probe"
    if not ctx.env.has("sglang"):
        results.append(CheckResult(name, Status.SKIP, f"sglang not importable ({ctx.env.packages.get('sglang')})"))
    else:
        results.append(_sglang_push(ctx, hf, name, transport="distributed"))
    return results


def part_tensor_transport(ctx: CheckContext) -> list[CheckResult]:
    name = "c  colocated tensor transport into an SGLang server on the same GPU"
    if ctx.device != "cuda":
        return [CheckResult(name, Status.SKIP, "needs CUDA (on CPU a tensor payload from another process kills the server)")]
    if not ctx.env.has("sglang"):
        return [CheckResult(name, Status.SKIP, f"sglang not importable ({ctx.env.packages.get('sglang')})")]
    return [_sglang_push(ctx, tiny_hf_dir(ctx), name, transport="tensor")]


def _sglang_push(ctx: CheckContext, hf: str, name: str, transport: str) -> CheckResult:
    """Start one SGLang server on the model, push a scaled copy of the weights (so a push that did
    nothing cannot pass), and probe the server's greedy log-probs against transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    from minpro_megatron.models.tiny_hf import checkpoint_state_dict
    from minpro_megatron.serving.server import ServerLaunchSpec, SGLangServer
    from minpro_megatron.convert.buckets import iter_buckets
    from minpro_megatron.weights.sync import WeightSync
    from minpro_megatron.weights.transports import DistributedTransport, TensorTransport
    from minpro_megatron.weights.verify import LogprobProbe, hf_logprob_reference

    t0 = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).to(ctx.device).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.mul_(1.05)
    named = sorted(checkpoint_state_dict(hf_model).items())
    server = SGLangServer(ServerLaunchSpec(model_path=hf, device=ctx.device, dtype="float32"),
                          ctx.work_dir / f"sglang_{transport}.log")
    server.start()
    try:
        server.wait_ready()
        tr = DistributedTransport() if transport == "distributed" else TensorTransport()
        sync = WeightSync([server.url], tr, probe=LogprobProbe([5, 6, 7, 8], threshold=1e-3))
        try:
            result = sync.sync(iter_buckets(named, 8 << 20), step=1, reference=hf_logprob_reference(hf_model, ctx.device))
        finally:
            sync.close()
        probe = result.probe
        figure = (f"probe max|d logp|={probe.max_abs_diff:.3g} (threshold 1e-3), "
                  f"{result.bytes / 2**20:.1f} MiB in {result.transfer_seconds:.3f} s")
        return CheckResult(name, Status.PASS if probe.passed else Status.FAIL, figure, seconds=time.perf_counter() - t0)
    finally:
        server.stop()


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float):
    """The [T, V] fp32 reference: log_softmax over full logits, label gather, entropy."""
    z = (hidden.float() @ weight.float().t()) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, labels[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def part_logprobs(ctx: CheckContext) -> list[CheckResult]:
    from minpro_megatron.learner.logprobs import vocab_parallel_logprobs

    tokens, vocab, hidden = (512, 4096, 64) if ctx.small else (16384, 151936, 2048)
    dev = torch.device(ctx.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = torch.randn(tokens, hidden, generator=g).to(dev, dtype)
    w0 = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dev, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    out: dict[str, dict] = {}
    for path in ("naive", "chunked"):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if path == "naive":
            logp, ent = naive_logprobs(h, w, labels, 0.7)
        else:
            logp, ent = vocab_parallel_logprobs(h, w, labels, temperature=0.7)
        (logp.sum() + 0.1 * ent.sum()).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else math.nan
        out[path] = {"logp": logp.detach().float().cpu(), "ent": ent.detach().float().cpu(),
                     "gh": h.grad.float().cpu(), "seconds": seconds, "peak": peak}
        del h, w, logp, ent
    n, c = out["naive"], out["chunked"]
    # both paths compute fp32 logits from the same (bf16) inputs: only summation order differs
    comps = {
        "logp": compare(c["logp"], n["logp"], atol=2e-3 if dtype == torch.bfloat16 else 1e-4),
        "entropy": compare(c["ent"], n["ent"], atol=2e-3 if dtype == torch.bfloat16 else 1e-4),
        "grad_hidden": compare(c["gh"], n["gh"], atol=1e-2 if dtype == torch.bfloat16 else 1e-4),
    }
    res = CheckResult.from_comparisons(f"d  chunked log-probs T={tokens} V={vocab} on {ctx.device}", comps,
                                       seconds=n["seconds"] + c["seconds"])
    if dev.type == "cuda":
        ratio = c["peak"] / n["peak"]
        res.figure = (f"peak fwd+bwd {c['peak'] / 2**30:.2f} GiB vs naive {n['peak'] / 2**30:.2f} GiB ({ratio:.3f}x), "
                      f"time {c['seconds']:.3f} s vs {n['seconds']:.3f} s; ") + res.figure
        res.values.update(peak_chunked=c["peak"], peak_naive=n["peak"], peak_ratio=ratio)
    return [res]


def part_quantized(ctx: CheckContext) -> list[CheckResult]:
    from minpro_megatron.gpucheck.quantized import run_part

    return run_part(ctx)


PARTS = {
    "a": ("learner step on the device vs the CPU fp32 reference (local spec, and TE when importable)", part_learner),
    "b": ("streaming exporter over the device's process group; push into an SGLang server + probe", part_export),
    "c": ("colocated tensor transport into an SGLang server on the same GPU", part_tensor_transport),
    "d": ("chunked vocabulary log-probs vs naive log_softmax: values and peak memory", part_logprobs),
    "e": ("fp8 rollouts: SGLang booted from a real fp8 export, fp8 buckets synced, probe + bytes per sync", part_quantized),
}

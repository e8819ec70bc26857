#!/usr/bin/env python
"""The prepared GPU check: one script, one call on a GPU machine, a figure and PASS / FAIL / SKIP per part.

Parts (select with --parts, default all):
  a  Learner on the device. A tiny Qwen3-MoE (Hugging Face safetensors made locally) is loaded into the
     Megatron-Core GPTModel; a fixed batch is scored, one MinPRO train step runs, the batch is scored
     again. fp32 on the device must equal the fp32 CPU reference (run in a child process with CUDA
     hidden) to 1e-4 in log-probs, loss and grad norm; bf16 within bf16 tolerance (log-probs 0.1,
     loss / grad norm 5%). Local spec always; the TransformerEngine spec too when transformer_engine
     imports (SKIP otherwise, with the import error).
  b  Weight export. b1: the streaming HF exporter runs over the device's process group (NCCL on a GPU)
     and must return the loaded weights bit for bit. b2: the distributed transport pushes weights into
     an SGLang server on the device and the probe's max |d log-prob| against transformers on the same
     weights must stay under 1e-3 (SKIP when sglang does not import).
  c  Colocated tensor transport into an SGLang server on the same GPU, same probe (needs CUDA + sglang).
  d  Chunked vocabulary-parallel log-probs at V=151936, T=16384, H=2048 (bf16 inputs): log-probs,
     entropy and hidden gradient equal the naive [T, V] log_softmax path; peak GPU memory of both.
  e  Quantized rollouts (rollout.quantization=fp8). An SGLang server on the GPU boots from a real fp8 export
     (float8_e4m3fn weights + per-tensor scales, SGLang's fp8 loader, dynamic per-token activations) of
     policy A, then receives policy B as fp8 buckets through the distributed transport; the probe must
     match transformers fp32 models holding the dequantized weights of A (boot) and B (after the sync) to
     0.15 (bf16 compute + fp8 activations), and the server must have moved away from A. Reports the bytes
     per sync against bf16. On the CPU the same flow in dequantized mode (fp32 weights, 1e-4). SKIP
     without sglang / nvidia-modelopt, or on a GPU below sm_89.

Installs nothing by itself: the machine must already have megatron-core (and optionally TransformerEngine
and SGLang with its CUDA kernels); see docs/gpu.md for how the check was run and what it printed.
Exit code: 1 if any part FAILed (or a part named by --require was SKIPped), else 0.

    python tools/gpu_check.py                      # all parts on the GPU
    python tools/gpu_check.py --parts a,d --out /tmp/gpucheck
    python tools/gpu_check.py --device cpu --small # the CPU rehearsal that CI runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from minpro_megatron.gpucheck.parts import PARTS

    ap = argparse.ArgumentParser(
        prog="tools/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog="parts:\n" + "\n".join(f"  {k}  {v[0]}" for k, v in PARTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: cuda when torch sees a GPU; cpu runs the same comparisons on the CPU")
    ap.add_argument("--small", action="store_true", help="CPU-test sizes (part d at T=512, V=4096)")
    ap.add_argument("--out", default=None, help="work directory: models, worker logs, report.json (default: a temp dir)")
    ap.add_argument("--require", default="", help="comma-separated part-name prefixes whose SKIP counts as FAIL (e.g. 'a transformer_engine')")
    args = ap.parse_args(argv)
    unknown = sorted(set(p for p in args.parts.split(",") if p) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from minpro_megatron.gpucheck import CheckResult, Status, detect_environment, exit_code, render_report
    from minpro_megatron.gpucheck.parts import PARTS, CheckContext
    from minpro_megatron.gpucheck.report import results_to_json

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = detect_environment()
    print(f"[gpu_check] {env.summary()}", flush=True)
    print(f"[gpu_check] device {device}; work dir {work}", flush=True)
    ctx = CheckContext(device=device, work_dir=work, env=env, small=args.small)
    results: list[CheckResult] = []
    for key in [p for p in args.parts.split(",") if p]:
        title, fn = PARTS[key]
        print(f"[gpu_check] part {key}: {title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            part_results = fn(ctx)
        except Exception as exc:  # one broken part must not hide the others
            part_results = [CheckResult(f"{key}  {title}", Status.FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                        detail=traceback.format_exc(), seconds=time.perf_counter() - t0)]
        for r in part_results:
            print(f"[gpu_check]   {r.status.value} {r.part}: {r.figure}", flush=True)
        results.extend(part_results)
    report = render_report(results, header=f"GPU check on {env.device_name or 'CPU'} ({device})")
    print(report, flush=True)
    (work / "report.json").write_text(results_to_json(results, env.as_dict()))
    (work / "report.txt").write_text(report + "\n")
    require = [p.strip() for p in args.require.split(",") if p.strip()]
    return exit_code(results, require)


if __name__ == "__main__":
    sys.exit(main())

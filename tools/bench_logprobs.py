"""Peak memory and time: chunked vocab-parallel log-prob + entropy vs the naive [T, V] fp32 log_softmax.

    python tools/bench_logprobs.py                     # T=8192, V=65536, H=256, temperature 0.7
    python tools/bench_logprobs.py --tokens 2048 --vocab 32768

Each (path, phase) runs in its own fresh subprocess, one after another, so the peaks do not mix.
Memory = the process's resident-set high-water mark (Linux VmHWM) minus the resident set just before
the measured call, after the inputs exist. VmHWM counts every page torch's CPU allocator touched
(large tensors are mmap'd and returned to the OS on free, so tracemalloc would see none of them); the
mark is reset right before the call through /proc/self/clear_refs ("5"); where that is not allowed
the script says so and uses ru_maxrss (then the baseline includes start-up). Outputs of every case
are saved and compared with the naive path's (max |difference| columns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(path: str, phase: str, tokens: int, vocab: int, hidden: int, chunk: int, temperature: float, out: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from minpro_megatron.learner.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(phase == "fwd+bwd")
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_(phase == "fwd+bwd")
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    g_logp, g_ent = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)

    def naive():
        logits = (h @ w.t()).float() / temperature  # [T, V] fp32
        logprobs = torch.log_softmax(logits, dim=-1)
        logp = logprobs.gather(1, labels[:, None]).squeeze(1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return logp, entropy

    def chunked():
        return vocab_parallel_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk)

    fn = naive if path == "naive" else chunked
    base = _rss_kib()
    reset = _reset_hwm()
    t0 = time.perf_counter()
    logp, ent = fn()
    if phase == "fwd+bwd":
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    seconds = time.perf_counter() - t0
    if reset:
        peak = _hwm_kib() - base
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    result = {"logp": logp.detach(), "entropy": ent.detach()}
    if phase == "fwd+bwd":
        result.update(grad_hidden=h.grad, grad_weight=w.grad)
    torch.save(result, out)
    return {"peak_mib": peak / 1024, "seconds": seconds, "hwm_reset": reset}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked path")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--case", nargs=2, metavar=("PATH", "PHASE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one measurement
        stats = run_case(*args.case, args.tokens, args.vocab, args.hidden, args.chunk, args.temperature, args.out)
        print(json.dumps(stats))
        return

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("fwd", "fwd+bwd"):
            outs = {}
            for path in ("naive", "chunked"):
                out = os.path.join(tmp, f"{path}_{phase}.pt")
                cmd = [sys.executable, __file__, "--case", path, phase, "--out", out]
                cmd += [f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "chunk", "temperature")]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"{path} {phase} failed:\n{proc.stderr[-3000:]}")
                stats = json.loads(proc.stdout.strip().splitlines()[-1])
                outs[path] = torch.load(out)
                rows.append((path, phase, stats))
            diffs = {k: (outs["chunked"][k].double() - outs["naive"][k].double()).abs().max().item() for k in outs["naive"]}
            rows[-1][2]["diffs"] = diffs

    print(f"T={args.tokens} V={args.vocab} H={args.hidden} chunk={args.chunk} temperature={args.temperature} "
          f"fp32, torch threads={torch.get_num_threads()}")
    print(f"naive [T, V] fp32 logits = {args.tokens * args.vocab * 4 / 2**20:.0f} MiB each")
    print(f"{'path':<8} {'phase':<8} {'peak MiB':>10} {'vs naive':>9} {'time s':>8} {'vs naive':>9}  max |chunked - naive|")
    naive = {}
    for path, phase, s in rows:
        if path == "naive":
            naive[phase] = s
        n = naive[phase]
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in s.get("diffs", {}).items())
        print(f"{path:<8} {phase:<8} {s['peak_mib']:>10.1f} {s['peak_mib'] / n['peak_mib']:>9.3f} "
              f"{s['seconds']:>8.2f} {s['seconds'] / n['seconds']:>9.2f}  {diffs}")
    from bench_common import report

    for path, phase, s in rows:
        if path == "chunked":
            ratio = s["peak_mib"] / naive[phase]["peak_mib"]
            worst = max(s.get("diffs", {}).values(), default=0.0)
            report("bench_logprobs", f"T={args.tokens // 1024}k V={args.vocab // 1024}k {phase}",
                   f"chunked / naive peak memory {ratio:.3f}x, time {s['seconds'] / naive[phase]['seconds']:.2f}x, max |diff| {worst:.1e}",
                   "<= 0.25x memory", ratio <= 0.25)
    if not all(s["hwm_reset"] for _, _, s in rows):
        print("note: /proc/self/clear_refs not writable; peaks are ru_maxrss minus the pre-call RSS")


if __name__ == "__main__":
    main()

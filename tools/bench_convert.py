#!/usr/bin/env python
"""Peak memory and time of HF <-> Megatron conversion, against the model's size.

Builds a random Qwen3-MoE locally (default ~380 MB in bf16: hidden 512, 8 layers, 32 experts), saves it
with transformers, then runs tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py as
child processes (one process, and optionally under torchrun with an EP2 layout) while sampling the
memory of the whole process tree (the converter, dist_checkpointing's Manager and writer processes):

    layout  direction  model MB  ranks  base MB  peak MB  max (peak-base)/model  sum (peak-base)/model  tree PSS MB  s

* base: a rank's RSS after imports and distributed start-up (python + torch + megatron), before any
  model memory; peak: its ru_maxrss (both rank 0's). (peak - base) / model is the conversion's own
  footprint in units of the model (1.0 = one copy): the largest over ranks, and the sum over ranks
  (what one host needs when all ranks share it). tree PSS: the largest sampled sum of proportional set
  sizes over the process tree (converter ranks, torchrun agent, dist_checkpointing's Manager and writer
  processes; shared pages counted once), start-up included.

    python tools/bench_convert.py                       # ~1-2 min on 2 cores
    python tools/bench_convert.py --layers 4 --experts 16 --layouts tp1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(path: Path, args: argparse.Namespace) -> int:
    import torch

    from minpro_megatron.models.tiny_hf import build_char_tokenizer, build_tiny_config, save_tiny_model

    tok = build_char_tokenizer()
    config = build_tiny_config(
        kind="qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
        num_kv_heads=4, head_dim=args.hidden // 8, num_experts=args.experts, top_k=4,
        moe_intermediate_size=args.moe_ffn, intermediate_size=args.moe_ffn * 4, initializer_range=0.02,
    )
    from transformers import AutoModelForCausalLM

    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_tiny_model(model, tok, path, dtype="bfloat16")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return nbytes


class TreeSampler:
    """Largest sum of PSS (and RSS) over a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            pss = rss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss += info.pss
                    rss += info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run(cmd: list[str], stats: Path, nproc: int) -> dict:
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    ranks = [json.loads(stats.read_text())] + [json.loads(Path(f"{stats}.rank{r}").read_text()) for r in range(1, nproc)]
    return dict(ranks=ranks, tree_pss=sampler.peak_pss, tree_rss=sampler.peak_rss)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--moe-ffn", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layouts", default="tp1,ep2", help="comma list of tp1 (one process) and ep2 (torchrun, 2 ranks)")
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    t = time.perf_counter()
    model_bytes = build_model(hf, args)
    print(f"random Qwen3-MoE: {model_bytes / 1e6:.0f} MB bf16 ({args.layers} layers, {args.experts} experts, hidden "
          f"{args.hidden}), built and saved in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for layout in args.layouts.split(","):
        nproc, extra = (1, []) if layout == "tp1" else (2, ["--ep", "2"])
        mc, back = work / f"mcore_{layout}", work / f"back_{layout}"
        s1, s2 = work / f"s1_{layout}.json", work / f"s2_{layout}.json"
        a = run(["tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(mc), "--no-progress",
                 "--stats-json", str(s1), *extra], s1, nproc)
        rows.append((layout, "HF -> Megatron", a))
        b = run(["tools/convert_megatron_to_hf.py", "--ckpt", str(mc), "--out", str(back), "--no-progress",
                 "--max-shard-mb", "100", "--stats-json", str(s2), *extra], s2, nproc)
        rows.append((layout, "Megatron -> HF", b))
        _check_equal(hf, back)
    mb = 1e6
    print(f"\n{'layout':7s} {'direction':15s} {'model MB':>9s} {'ranks':>5s} {'base MB':>8s} {'peak MB':>8s} "
          f"{'max (peak-base)/model':>22s} {'sum (peak-base)/model':>22s} {'tree PSS MB':>12s} {'s':>6s}")
    for layout, direction, d in rows:
        ranks = d["ranks"]
        own = [(r["rss_peak"] - r["rss_before"]) / model_bytes for r in ranks]
        r0 = ranks[0]
        print(f"{layout:7s} {direction:15s} {model_bytes / mb:9.0f} {len(ranks):5d} {r0['rss_before'] / mb:8.0f} "
              f"{r0['rss_peak'] / mb:8.0f} {max(own):22.2f} {sum(own):22.2f} {d['tree_pss'] / mb:12.0f} "
              f"{r0['seconds']:6.1f}")
    print("\nRound trip (HF -> Megatron -> HF) bit-exact in every layout: yes")
    from bench_common import report

    for layout, direction, d in rows:
        own = max((r["rss_peak"] - r["rss_before"]) / model_bytes for r in d["ranks"])
        report("bench_convert", f"{model_bytes / 1e6:.0f} MB Qwen3-MoE, {layout}, {direction}",
               f"peak RSS growth per rank {own:.2f}x the model, round trip bit-exact", "<= 2x the model", own <= 2.0)
    if tmp is not None:
        tmp.cleanup()


def _check_equal(a: Path, b: Path) -> None:
    import torch

    from minpro_megatron.convert.hf_io import HFCheckpoint

    x, y = HFCheckpoint(a), HFCheckpoint(b)
    if sorted(x.names()) != sorted(y.names()):
        raise SystemExit(f"round trip changed the tensor names: {set(x.names()) ^ set(y.names())}")
    changed = [n for n in x.names() if not torch.equal(x.get(n), y.get(n))]
    if changed:
        raise SystemExit(f"round trip changed {changed[:5]}")


if __name__ == "__main__":
    main()

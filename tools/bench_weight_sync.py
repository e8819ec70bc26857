#!/usr/bin/env python
"""Weight-sync throughput of the transports that run on this host, against a same-run memcpy.

Starts real SGLang server(s) (fp32, CPU path) with a random Qwen3-MoE, then pushes a second random
model of the same shape through each transport several times and prints a table:

    transport / layout          calls  MB   transfer s (best, median)  MB/s  x memcpy  sync s  probe max|d|

* memcpy: one copy of a buffer of the same byte count (best of reps), the upper bound on this host.
* distributed (gloo): flattened buckets of --bucket-mb; one flattened bucket holding the whole model;
  per-tensor (one update call and one broadcast per tensor); one call with one broadcast per tensor.
* disk: bucketed shards (one safetensors file per bucket) and per-tensor shards.
"transfer" is the transport's own time (HTTP calls + broadcast or write + load); "sync" adds pause,
begin/end, flush and continue. The tensor transport needs colocated GPUs and is not run here.

    python tools/bench_weight_sync.py --servers 1 --hidden 256 --layers 4 --experts 8 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minpro_megatron.models.tiny_hf import build_tiny_model, checkpoint_state_dict, make_tiny_model_dir
from minpro_megatron.rollout.server import ServerLaunchSpec, ServerPool
from minpro_megatron.weights.buckets import iter_buckets
from minpro_megatron.weights.sync import WeightSync
from minpro_megatron.weights.transports import DiskTransport, DistributedTransport, Transport
from minpro_megatron.weights.verify import LogprobProbe, hf_logprob_reference


def memcpy_seconds(nbytes: int, reps: int = 10) -> float:
    """Best of ``reps`` copies of ``nbytes`` between pre-touched buffers (page faults excluded)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work-dir", type=str, default=None, help="models, logs and disk shards (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_weight_sync_"))
    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_layers=args.layers,
        num_heads=max(4, args.hidden // 64),
        num_kv_heads=2,
        head_dim=64 if args.hidden >= 256 else 16,
        num_experts=args.experts,
        moe_intermediate_size=args.moe_intermediate,
        initializer_range=0.125,
    )
    make_tiny_model_dir(work / "model_a", kind="qwen3_moe", seed=1, dtype="float32", **shape)
    model_b = build_tiny_model("qwen3_moe", seed=2, vocab_size=32, **shape)
    tensors = list(checkpoint_state_dict(model_b).items())
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    bucket_bytes = int(args.bucket_mb * 2**20)
    print(f"model: {len(tensors)} tensors, {nbytes / 2**20:.1f} MiB fp32; servers: {args.servers}; work dir {work}")

    pool = ServerPool(
        [ServerLaunchSpec(model_path=str(work / "model_a"), device="cpu", dtype="float32") for _ in range(args.servers)],
        work / "logs",
    )
    t0 = time.perf_counter()
    pool.start()
    print(f"servers ready in {time.perf_counter() - t0:.1f} s")
    probe = LogprobProbe([4, 5, 13, 6, 7, 16], max_new_tokens=4)
    ref = hf_logprob_reference(model_b)

    def one_each(named):
        return ([nt] for nt in named)

    cases: list[tuple[str, Transport, callable]] = [
        (f"distributed gloo, flat buckets {args.bucket_mb:g} MB", DistributedTransport("gloo"), lambda: iter_buckets(tensors, bucket_bytes)),
        ("distributed gloo, 1 flat bucket (whole model)", DistributedTransport("gloo"), lambda: iter([tensors])),
        ("distributed gloo, per-tensor calls", DistributedTransport("gloo", flattened=False), lambda: one_each(tensors)),
        ("distributed gloo, 1 call, per-tensor bcast", DistributedTransport("gloo", flattened=False), lambda: iter([tensors])),
        (f"disk, shards of {args.bucket_mb:g} MB", DiskTransport(work / "disk", work / "model_a", keep_last=1), lambda: iter_buckets(tensors, bucket_bytes)),
        ("disk, one shard per tensor", DiskTransport(work / "disk", work / "model_a", keep_last=1), lambda: one_each(tensors)),
    ]
    rows = []
    step = 0
    try:
        for name, transport, make in cases:
            mem_s = memcpy_seconds(nbytes)  # re-measured next to each case: the host is shared and noisy
            sync = WeightSync(pool.urls, transport, probe=probe)
            transfer, total, calls, diff = [], [], 0, 0.0
            for _ in range(args.reps):
                step += 1
                r = sync.sync(make(), step, reference=ref)
                transfer.append(r.transfer_seconds)
                total.append(r.seconds)
                calls, diff = r.buckets, max(diff, r.probe.max_abs_diff)
            sync.close()
            best = min(transfer)
            rows.append((name, calls, best, statistics.median(transfer), nbytes / best / 2**20, nbytes / mem_s / 2**20, mem_s / best, min(total), diff))
    finally:
        pool.stop()

    hdr = (
        f"{'transport / layout':46s} {'calls':>5s} {'transfer s best':>15s} {'median':>8s} {'MiB/s':>8s} "
        f"{'memcpy MiB/s':>12s} {'x memcpy':>9s} {'sync s':>7s} {'probe max|d|':>12s}"
    )
    print(f"\nbytes per sync: {nbytes / 2**20:.1f} MiB to {args.servers} server(s); best of {args.reps} syncs per row; "
          "memcpy = best of 10 copies of the same bytes measured just before the row")
    print(hdr)
    print("-" * len(hdr))
    for name, calls, best, med, mbs, mem_mbs, ratio, tot, diff in rows:
        print(f"{name:46s} {calls:5d} {best:15.3f} {med:8.3f} {mbs:8.1f} {mem_mbs:12.0f} {ratio:9.4f} {tot:7.3f} {diff:12.2e}")


if __name__ == "__main__":
    main()

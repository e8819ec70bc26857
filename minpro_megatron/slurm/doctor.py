"""Distributed health check: run it with the same launcher, nodes and config as the trainer.

    torchrun ... -m minpro_megatron.slurm.doctor [options] [CONFIG [overrides...]]
    minpro-slurm submit CONFIG slurm.program=doctor        # the same sbatch job, doctor instead of trainer

Checks, in order, each printed and written to ``<logging.output_dir>/doctor.json`` by rank 0:
1. rendezvous: every rank reports host, Slurm node, local rank, devices and socket interfaces
   (the topology table);
2. the config's parallel layout at this world size (TP x PP x CP x DP, EP), if a CONFIG is given;
3. collectives: all_reduce, broadcast and all_gather give exact, known results on every rank;
4. all_reduce bandwidth per message size: time, algbw and busbw = algbw * 2(n-1)/n, per rank;
5. rollout servers in ``rollout.server_urls`` answer GET /health from rank 0;
6. optional soak (``--soak-steps``): a step loop with the trainer's stop protocol: on TERM/USR1 or the
   stop file it saves a checkpoint (``checkpoint.dir``) and exits 0; with ``checkpoint.load`` it resumes.
Exit code 0 only if every check passed. Rank metadata travels as JSON in uint8 tensors (no pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minpro_megatron.checkpoint_tracker import checkpoint_path, latest_iteration, write_tracker
from minpro_megatron.train.stop import StopRequest

__all__ = ["main", "all_gather_json", "check_collectives", "measure_bandwidth"]


def _device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(obj: Any, device: torch.device) -> list[Any]:
    """all_gather of a JSON-serialisable object through uint8 tensors (lengths first, then padded bytes)."""
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(bytes(t[: int(s.item())].cpu().tolist()).decode()) for t, s in zip(out, sizes)]


def rank_info() -> dict[str, Any]:
    env = os.environ
    info = {
        "rank": dist.get_rank(),
        "local_rank": int(env.get("LOCAL_RANK", 0)),
        "node_rank": int(env.get("GROUP_RANK", env.get("SLURM_NODEID", 0))),
        "host": socket.gethostname(),
        "slurm_node": env.get("SLURMD_NODENAME"),
        "pid": os.getpid(),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "nccl_socket_ifname": env.get("NCCL_SOCKET_IFNAME"),
        "gloo_socket_ifname": env.get("GLOO_SOCKET_IFNAME"),
        "node_ip": env.get("MINPRO_NODE_IP"),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return info


def check_collectives(device: torch.device, numel: int = 4099) -> dict[str, Any]:
    """Exact checks with small integers (exact in fp32): failures name the collective and the rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pattern = (torch.arange(numel, device=device) % 7 + 1).float()
    x = pattern * (rank + 1)
    dist.all_reduce(x)
    expected = pattern * (world * (world + 1) // 2)
    errors = []
    if not torch.equal(x, expected):
        errors.append(f"all_reduce: max |error| {float((x - expected).abs().max()):g}")
    b = pattern * 3 if rank == 0 else torch.zeros_like(pattern)
    dist.broadcast(b, src=0)
    if not torch.equal(b, pattern * 3):
        errors.append("broadcast from rank 0: wrong values")
    parts = [torch.empty(3, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.full((3,), float(rank), device=device))
    if [int(p[0].item()) for p in parts] != list(range(world)):
        errors.append(f"all_gather: got ranks {[int(p[0].item()) for p in parts]}")
    return {"ok": not errors, "errors": errors}


def measure_bandwidth(device: torch.device, sizes_mb: list[float], iters: int) -> list[dict[str, float]]:
    """all_reduce timing per size on this rank (after one warm-up): seconds, algbw and busbw in GB/s."""
    world = dist.get_world_size()
    rows = []
    for mb in sizes_mb:
        x = torch.ones(max(1, int(mb * 2**20 / 4)), dtype=torch.float32, device=device)
        dist.all_reduce(x)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / iters
        nbytes = x.numel() * 4
        algbw = nbytes / dt / 1e9
        rows.append({"size_mb": mb, "seconds": dt, "algbw_gbps": algbw,
                     "busbw_gbps": algbw * 2 * (world - 1) / world if world > 1 else algbw})
    return rows


def check_layout(config: str, overrides: list[str], world: int) -> dict[str, Any]:
    from minpro_megatron.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
        cfg.validate(world_size=world)
    except ConfigError as exc:
        return {"ok": False, "error": str(exc)}
    p = cfg.parallel
    return {"ok": True, "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context,
            "data": p.data_parallel_size(world), "expert": p.expert, "expert_tensor": p.expert_tensor or 1,
            "server_urls": list(cfg.rollout.server_urls), "api_key_file": cfg.rollout.api_key_file,
            "checkpoint_dir": cfg.checkpoint.dir,
            "checkpoint_load": cfg.checkpoint.load, "output_dir": cfg.logging.output_dir}


def check_servers(urls: list[str], timeout: float = 10.0, api_key: str | None = None) -> list[dict[str, Any]]:
    """GET /health of every server; with the fleet's API key also GET /model_info, which needs it."""
    from minpro_megatron.serving.auth import bearer

    rows = []
    for url in urls:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
                row = {"url": url, "ok": resp.status == 200, "status": resp.status,
                       "ms": round((time.perf_counter() - t0) * 1e3, 1)}
            if api_key:
                req = urllib.request.Request(url.rstrip("/") + "/model_info", headers=bearer(api_key))
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    row["authenticated"] = resp.status == 200
                    row["ok"] = row["ok"] and row["authenticated"]
            rows.append(row)
        except OSError as exc:
            rows.append({"url": url, "ok": False, "error": str(exc)})
    return rows


def soak(device: torch.device, stop: StopRequest, steps: int, step_seconds: float, ckpt_dir: str | None,
         load: str | None, progress: Path | None) -> dict[str, Any]:
    """The trainer's step loop in miniature: collective work per step, the stop protocol, save/resume."""
    rank = dist.get_rank()
    start = (latest_iteration(load) or 0) if load else 0
    step = start
    while step < steps:
        x = torch.ones(1024, device=device)
        dist.all_reduce(x)
        time.sleep(step_seconds)
        step += 1
        if rank == 0 and progress is not None:
            progress.write_text(f"{step}\n")
        if stop.should_stop():
            break
    result = {"resumed_from": start if load else None, "steps_done": step, "target_steps": steps,
              "stop_reason": stop.reason}
    if stop.reason and ckpt_dir:  # "save": every rank writes its shard, then rank 0 moves the pointer
        it_dir = checkpoint_path(ckpt_dir, step)
        it_dir.mkdir(parents=True, exist_ok=True)
        (it_dir / f"rank{rank:05d}.json").write_text(json.dumps({"step": step, "reason": stop.reason}))
        dist.barrier()
        if rank == 0:
            write_tracker(ckpt_dir, step)
        result["saved"] = str(it_dir)
    return result


def _print_topology(infos: list[dict[str, Any]]) -> None:
    nodes: dict[str, list[dict[str, Any]]] = {}
    for info in infos:
        nodes.setdefault(info["slurm_node"] or info["host"], []).append(info)
    print(f"[doctor] topology: {len(infos)} ranks on {len(nodes)} node(s)")
    for node, ranks in nodes.items():
        r0 = ranks[0]
        print(f"  {node:<12} ranks {','.join(str(r['rank']) for r in ranks):<16} host={r0['host']} "
              f"ip={r0['node_ip']} NCCL_SOCKET_IFNAME={r0['nccl_socket_ifname']} "
              f"CUDA_VISIBLE_DEVICES={r0['cuda_visible_devices']}" + (f" {r0['device']}" if "device" in r0 else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.slurm.doctor", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    ap.add_argument("--sizes-mb", default="1,16", help="all_reduce message sizes in MB (comma list)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--soak-steps", type=int, default=0)
    ap.add_argument("--step-seconds", type=float, default=0.2)
    ap.add_argument("--report", help="JSON report path (default <logging.output_dir>/doctor.json)")
    ap.add_argument("config", nargs="?")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    stop = StopRequest.install()  # from the start: a TERM during the checks must not kill a soak run
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    t0 = time.perf_counter()
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(backend)
    report: dict[str, Any] = {"world_size": world, "backend": backend,
                              "rendezvous_seconds": round(time.perf_counter() - t0, 3),
                              "config": args.config, "overrides": args.overrides,
                              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
    infos = all_gather_json(rank_info(), device)
    report["ranks"] = infos
    report["nodes"] = sorted({i["slurm_node"] or i["host"] for i in infos})
    if rank == 0:
        _print_topology(infos)

    ok = True
    layout = check_layout(args.config, args.overrides, world) if args.config else None
    report["layout"] = layout
    if layout is not None:
        ok &= layout["ok"]
        if rank == 0:
            print("[doctor] layout: " + (f"TP {layout['tensor']} x PP {layout['pipeline']} x CP {layout['context']}"
                                         f" x DP {layout['data']} = {world}, EP {layout['expert']}"
                                         if layout["ok"] else f"INVALID: {layout['error']}"))

    coll = all_gather_json(check_collectives(device), device)
    report["collectives_ok"] = all(c["ok"] for c in coll)
    ok &= report["collectives_ok"]
    if rank == 0:
        bad = [f"rank {r}: {e}" for r, c in enumerate(coll) for e in c["errors"]]
        print("[doctor] collectives: " + ("all_reduce, broadcast, all_gather exact on every rank"
                                          if not bad else "FAILED " + "; ".join(bad)))

    sizes = [float(s) for s in args.sizes_mb.split(",") if s]
    bw = all_gather_json(measure_bandwidth(device, sizes, args.iters), device)
    report["bandwidth"] = [{"size_mb": sizes[i],
                            "busbw_gbps_min": min(r[i]["busbw_gbps"] for r in bw),
                            "busbw_gbps_max": max(r[i]["busbw_gbps"] for r in bw),
                            "seconds_max": max(r[i]["seconds"] for r in bw),
                            "per_rank_busbw_gbps": [round(r[i]["busbw_gbps"], 4) for r in bw]}
                           for i in range(len(sizes))]
    if rank == 0:
        for row in report["bandwidth"]:
            print(f"[doctor] all_reduce {row['size_mb']:g} MB: {row['seconds_max'] * 1e3:.2f} ms, busbw "
                  f"{row['busbw_gbps_min']:.3f}-{row['busbw_gbps_max']:.3f} GB/s over ranks")

    urls = (layout or {}).get("server_urls") or []
    if urls:
        key_file = (layout or {}).get("api_key_file")
        if rank == 0:
            from minpro_megatron.serving.auth import read_key_file

            servers = check_servers(urls, api_key=read_key_file(key_file) if key_file else None)
        else:
            servers = []
        report["rollout_servers"] = servers
        flag = torch.tensor([0 if all(s["ok"] for s in servers) else 1], device=device)
        dist.broadcast(flag, src=0)
        ok &= not flag.item()
        if rank == 0:
            for s in servers:
                print(f"[doctor] rollout server {s['url']}: " + (f"healthy ({s['ms']} ms)" if s["ok"] else
                                                                 f"UNREACHABLE {s.get('error', s.get('status'))}"))

    out_dir = Path((layout or {}).get("output_dir") or ".")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.soak_steps:
        report["soak"] = soak(device, stop, args.soak_steps, args.step_seconds, (layout or {}).get("checkpoint_dir"),
                              (layout or {}).get("checkpoint_load"), out_dir / "progress.txt")
        if rank == 0:
            print(f"[doctor] soak: {report['soak']}")

    if rank == 0:
        path = Path(args.report) if args.report else out_dir / "doctor.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report["ok"] = bool(ok)
        path.write_text(json.dumps(report, indent=1))
        print(f"[doctor] {'OK' if ok else 'FAILED'}: report {path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run a function in N spawned processes set up like torchrun (for gloo tests).

    results = run_multiprocess(check_layouts, world_size=2, timeout=240)   # [rank 0 result, rank 1 ...]

Each process gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (a free port on 127.0.0.1)
and one torch thread; the function initialises torch.distributed itself (learner.distributed does).
Return values travel back as torch.save bytes (tensors welcome). The first failing rank's traceback
is raised as MultiprocessError (the other ranks are killed after a short grace period, since they may
be stuck in a collective); a rank that dies without reporting, or a run past ``timeout``, raises too.
``fn`` must be importable by the children: a module-level function of a test module or library.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["MultiprocessError", "free_port", "run_multiprocess"]


class MultiprocessError(RuntimeError):
    """A rank raised, died, or the run timed out; the message holds every rank's report."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_multiprocess(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    threads: int = 1,
    grace: float = 5.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results in rank order."""
    if world_size < 1:
        raise ValueError(f"run_multiprocess: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results: "mp.Queue" = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": str(threads),
            **(env or {}),
        }
        p = ctx.Process(target=_worker, args=(fn, args, kwargs, rank_env, threads, results), name=f"rank{rank}")
        p.start()
        procs.append(p)

    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_error_at: float | None = None
    try:
        while len(done) + len(errors) < world_size:
            now = time.monotonic()
            if first_error_at is not None and now - first_error_at > grace:
                break
            if now > deadline:
                missing = [r for r in range(world_size) if r not in done and r not in errors]
                errors.update({r: f"no result after {timeout:.0f} s (timeout)" for r in missing})
                break
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if p.exitcode is not None and rank not in done and rank not in errors:
                        _drain(results, done, errors)
                        if rank not in done and rank not in errors:
                            errors[rank] = f"process exited with code {p.exitcode} without reporting"
                if errors and first_error_at is None:
                    first_error_at = time.monotonic()
                continue
            if status == "ok":
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                first_error_at = first_error_at or time.monotonic()
    finally:
        descendants = _descendants(procs)  # e.g. dist_checkpointing's Manager, before their parents go
        for p in procs:
            p.join(timeout=0 if errors else 10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        for child in descendants:  # nothing a rank started may outlive the run
            try:
                child.kill()
            except Exception:
                pass
        results.close()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise MultiprocessError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [done[r] for r in range(world_size)]


def _descendants(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            out += psutil.Process(p.pid).children(recursive=True)
        except Exception:  # already gone
            pass
    return out


def _drain(results: "mp.Queue", done: dict, errors: dict) -> None:
    while True:
        try:
            rank, status, payload = results.get(timeout=0.2)
        except queue_mod.Empty:
            return
        if status == "ok":
            done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors[rank] = payload


def _worker(fn: Callable, args: tuple, kwargs: dict, env: dict[str, str], threads: int, results: "mp.Queue") -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)
    rank = int(env["RANK"])
    try:
        out = fn(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001  (report everything, including SystemExit / KeyboardInterrupt)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    """Best effort: leave no process group behind (no collective: peers may be gone)."""
    import sys

    import torch.distributed as dist

    ps = sys.modules.get("megatron.core.parallel_state")
    try:
        if ps is not None:
            ps.destroy_model_parallel()
    except Exception:
        pass
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass

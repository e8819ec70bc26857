"""Faults with real SGLang CPU servers (issue 12): a weight sync that fails on rank 0 ends every rank at once
with rank 0's error (items 7); a SIGKILLed trainer leaves no server or router behind (item 8); attaching to
running servers writes no full export (item 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]
REPO = Path(__file__).resolve().parents[2]
SGLANG = ["rollout.backend=sglang", "rollout.num_servers=1", "rollout.server_dtype=float32", "rollout.base_port=0",
          "rollout.router_port=0"]


def _train_catching(argv: list[str]) -> dict:
    from minpro_megatron.train.trainer import main

    t0 = time.time()
    try:
        main(argv)
    except Exception as exc:  # reported as data: both ranks' errors are compared
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.time() - t0}
    return {"error": None, "seconds": time.time() - t0}


def test_rank0_sync_failure_ends_both_ranks_with_its_error(tmp_path) -> None:
    # Rank 0 is the master of the weight-update group; an address it cannot bind makes its sync fail (the
    # kind of failure only rank 0 sees: the other rank is gathering weight shards for it at that moment).
    argv = [str(TINY), *QUICK, *SGLANG, "rollout.use_router=false", "train.warm_start_steps=1",
            "rollout.weight_sync_master_address=10.255.255.1", "rollout.weight_sync_timeout_s=20",
            "rollout.request_timeout_s=60", f"logging.output_dir={tmp_path / 'run'}"]
    r0, r1 = run_multiprocess(_train_catching, 2, argv, timeout=600)
    print(f"rank 0 exited after {r0['seconds']:.1f} s, rank 1 after {r1['seconds']:.1f} s")
    assert r1["error"] is not None and "Cannot assign requested address" in r1["error"], r1  # rank 0's cause
    for r in (r0, r1):
        assert "weight sync to step 0 failed on rank 0" in r["error"], r
    assert r0["error"] == r1["error"]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_trainer_leaves_no_server_or_router(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minpro_megatron.cli", "train", str(TINY), *QUICK, *SGLANG, "train.steps=200",
           "train.warm_start_steps=0", "train.eval_interval=0", f"logging.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[psutil.Process] = []
    try:
        jsonl = out / "tb" / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not (jsonl.is_file() and any(json.loads(x)["step"] >= 1 for x in jsonl.read_text().splitlines())):
            assert trainer.poll() is None, "the trainer exited before its first RL step"
            assert time.monotonic() < deadline, "no RL step within 400 s"
            time.sleep(0.5)
        started = _descendants(trainer.pid)  # the server (and its scheduler / detokenizer) and the router
        names = " ".join(" ".join(p.cmdline()) for p in started if _alive(p))
        assert "sglang.launch_server" in names and "sglang::router" in names, names
        os.kill(trainer.pid, signal.SIGKILL)  # no Python cleanup runs
        trainer.wait()
        time.sleep(10)
        survivors = [p.pid for p in started if _alive(p)]
        assert survivors == [], f"still running 10 s after the trainer died: {survivors}"
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for p in started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    # a new fleet in the same directory finds nothing left to reap, and its pid file names what it started
    pids = [json.loads(x) for x in (out / "rollout" / "logs" / "pids.json").read_text().splitlines()]
    assert len(pids) == 2 and {p["what"].split()[0] for p in pids} == {"sglang[0]", "router"}

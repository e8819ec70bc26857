"""The generated jobs on a real Slurm cluster (2 emulated nodes, 2 fake GPUs each): torchrun across
nodes, the rollout fleet with the real sglang-router, a sweep array + collector, and the USR1/TERM paths.

The launched program is the distributed health check (``minpro_megatron.slurm.doctor``) until the
trainer exists; the rollout servers are ``slurm.stub_server`` (a stand-in for sglang.launch_server
that answers /health), since SGLang servers on CPU cost ~25 s and 2.5 GB each.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minpro_megatron.slurm import submit

pytestmark = pytest.mark.slurm

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_moe_cpu.yaml")
# 2 ranks per node on fake GPUs: the same --gpus-per-node path as the H100 configs
CPU = ["--doctor", "slurm.gpus_per_node=2", "slurm.procs_per_node=2", "slurm.time=00:05:00", "rollout.backend=local"]
QUICK = 'slurm.program_args=["--sizes-mb","1","--iters","2"]'


def submit_job(run_dir: Path, *args: str) -> list[str]:
    assert submit.main([*args, "--run-dir", str(run_dir)]) == 0
    return (run_dir / "submissions.txt").read_text().splitlines()[-1].split()[2:]


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def read_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def test_doctor_across_two_nodes(slurm_env, tmp_path):
    run = tmp_path / "run"
    (job,) = submit_job(run, "submit", TINY, *CPU, QUICK, "--nodes", "2")
    state = slurm_env.wait_job(job, timeout=120)
    log = read_log(run)
    assert state == "COMPLETED", log
    assert slurm_env.job_info(job)["ExitCode"] == "0:0"
    report = json.loads((run / "output" / "doctor.json").read_text())
    assert report["ok"] and report["world_size"] == 4 and report["collectives_ok"]
    assert report["nodes"] == ["node1", "node2"]  # torchrun per node, c10d rendezvous across them
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1, 2, 3]
    assert {r["cuda_visible_devices"] for r in report["ranks"]} == {"0,1"}  # --gpus-per-node=2
    assert {r["nccl_socket_ifname"] for r in report["ranks"]} == {"lo"}  # route to node1 = 127.0.0.2
    # each node knows its own address (MINPRO_NODE_IP): node k is the loopback alias 127.0.0.(k+1)
    assert {(r["slurm_node"], r["node_ip"]) for r in report["ranks"]} == {("node1", "127.0.0.2"), ("node2", "127.0.0.3")}
    assert report["layout"]["data"] == 4 and report["layout"]["checkpoint_dir"] == str(run / "checkpoints")
    assert all(b["busbw_gbps_min"] > 0 for b in report["bandwidth"])
    assert "[doctor] OK" in log and log.count("[netif]") == 2


def test_rollout_fleet_router_and_learner(slurm_env, tmp_path):
    run = tmp_path / "run"
    (job,) = submit_job(
        run, "submit", TINY, *CPU, QUICK, "--nodes", "1", "--rollout-nodes", "1", "rollout.backend=sglang",
        "model.hf_path=stub-model", "slurm.rollout_server_module=minpro_megatron.slurm.stub_server",
        "rollout.server_device=cuda",  # fake GPUs stand for GPU nodes: no CPU-engine flags
        "rollout.base_port=31700", "rollout.router_port=31790", "rollout.server_dtype=float32",
        'rollout.server_extra_args=["--mem-fraction-static","0.5"]')
    state = slurm_env.wait_job(job, timeout=180)
    log = read_log(run)
    assert state == "COMPLETED", log
    (fleet_dir,) = (run / "rollout").iterdir()
    urls = (fleet_dir / "server_urls.txt").read_text().split()
    # served on the rollout node's own address (node2 = loopback alias 127.0.0.3), found by netif
    assert urls == ["http://127.0.0.3:31700", "http://127.0.0.3:31701"]
    assert (fleet_dir / "router_url.txt").read_text().strip() == "http://127.0.0.3:31790"
    for i in (0, 1):  # each server got its own GPU of the node and the rollout section's server options
        info = (fleet_dir / f"server-node2-{i}.log").read_text()
        assert f"'cuda_visible_devices': '{i}'" in info and "'model_path': 'stub-model'" in info
        assert "['--dtype', 'float32', '--mem-fraction-static', '0.5', '--weight-version', '0']" in info
    report = json.loads((run / "output" / "doctor.json").read_text())
    assert report["ok"] and report["nodes"] == ["node1"]  # the learner stays off the rollout node
    assert [s["url"] for s in report["rollout_servers"] if s["ok"]] == urls  # reached from the learner
    assert "rollout.server_urls=[http://127.0.0.3:31700,http://127.0.0.3:31701]" in report["overrides"]
    assert "rollout.router_url=http://127.0.0.3:31790" in report["overrides"]
    assert "[fleet] router healthy" in log
    # issue 12 item 13: a per-job key (0600) that the servers demand and the learner sends
    assert (fleet_dir / "api_key").stat().st_mode & 0o777 == 0o600
    for i in (0, 1):
        assert "'api_key_required': True" in (fleet_dir / f"server-node2-{i}.log").read_text()
    assert all(s.get("authenticated") for s in report["rollout_servers"]), report["rollout_servers"]
    assert f"rollout.api_key_file={fleet_dir / 'api_key'}" in report["overrides"]
    assert (fleet_dir / "api_key").read_text().strip() not in log


def test_sweep_array_then_collector(slurm_env, tmp_path):
    run = tmp_path / "sweep"
    array, collector = submit_job(
        run, "sweep", TINY, *CPU, QUICK, "--methods", "grpo,minpro", "--staleness", "2",
        "--collect-cmd", "cat {runs_dir}/*/overrides.txt > {sweep_dir}/collected.txt")
    assert slurm_env.job_info(collector)["Dependency"].startswith(f"afterany:{array}")
    for job in (array, collector):
        slurm_env.wait_job(job, timeout=180)
    log = read_log(run)
    assert slurm_env.job_state(collector) == "COMPLETED", log
    for name, method in (("grpo-n2", "grpo"), ("minpro-n2", "minpro")):
        task = run / "runs" / name
        assert (task / "overrides.txt").read_text().split() == [f"loss.name={method}", "rollout.staleness.n=2"]
        report = json.loads((task / "output" / "doctor.json").read_text())
        assert report["ok"] and report["overrides"][:2] == [f"loss.name={method}", "rollout.staleness.n=2"]
        assert report["layout"]["checkpoint_dir"] == str(task / "checkpoints")
    # the collector ran after both tasks had written their overrides
    assert sorted((run / "collected.txt").read_text().splitlines()) == [
        "loss.name=grpo rollout.staleness.n=2", "loss.name=minpro rollout.staleness.n=2"]


def _soak(run: Path, steps: int) -> list[str]:
    return submit_job(run, "submit", TINY, *CPU, "--nodes", "1",
                      f'slurm.program_args=["--sizes-mb","1","--iters","1","--soak-steps","{steps}",'
                      '"--step-seconds","0.2"]')


def _progress(run: Path) -> int:
    f = run / "output" / "progress.txt"
    return int(f.read_text() or 0) if f.exists() else 0


def test_usr1_saves_requeues_and_resumes(slurm_env, tmp_path):
    """The time-limit warning (USR1 to the batch shell, as --signal=B:USR1@120 sends it): the job
    script writes the stop file, every rank stops after the same step and saves, the job requeues
    itself and the next run resumes from checkpoint.load."""
    run = tmp_path / "run"
    (job,) = _soak(run, steps=25)
    wait_for(lambda: _progress(run) >= 2, 90, "soak progress")
    slurm_env._client(["scancel", "--signal=USR1", "--batch", job])
    state = slurm_env.wait_job(job, timeout=180)
    log = read_log(run)
    assert state == "COMPLETED", log
    assert slurm_env.job_info(job)["Restarts"] == "1"
    saved = int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 25
    shards = sorted((run / "checkpoints" / f"iter_{saved:07d}").glob("rank*.json"))
    assert [json.loads(s.read_text())["reason"] for s in shards] == ["stop file: USR1"] * 2
    report = json.loads((run / "output" / "doctor.json").read_text())  # the second run's report
    assert report["restart_count"] == 1 and f"checkpoint.load={run / 'checkpoints'}" in report["overrides"]
    assert report["soak"] == {"resumed_from": saved, "steps_done": 25, "target_steps": 25, "stop_reason": None}
    assert "SIGUSR1: asked the trainer to save and stop" in log and "requeueing job" in log


def test_scancel_term_saves_a_checkpoint(slurm_env, tmp_path):
    """scancel (TERM to the batch shell and every step process): the ranks save before they exit."""
    run = tmp_path / "run"
    (job,) = _soak(run, steps=500)
    wait_for(lambda: _progress(run) >= 2, 90, "soak progress")
    slurm_env._client(["scancel", job])
    assert slurm_env.wait_job(job, timeout=90) == "CANCELLED"
    assert (run / "stop_requested").read_text().strip() == "TERM"  # the batch shell's trap ran
    saved = int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    shards = sorted((run / "checkpoints" / f"iter_{saved:07d}").glob("rank*.json"))
    assert len(shards) == 2 and {json.loads(s.read_text())["reason"] for s in shards} <= {"SIGTERM", "stop file: TERM"}
    assert 2 <= saved < 500


def test_local_cluster_status_cli(slurm_env):

    out = subprocess.run([sys.executable, "-m", "minpro_megatron.slurm.local_cluster", "status",
                          "--prefix", str(slurm_env.prefix)], capture_output=True, text=True, check=True).stdout
    status = json.loads(out)
    assert set(status["daemons"]) >= {"slurmctld", "slurmd-node1", "slurmd-node2"}
    assert all(d["alive"] for d in status["daemons"].values())
    assert "node1" in status["sinfo"] and "gpu:2" in status["sinfo"]
    # the emulated nodes resolve (MASTER_ADDR), each to its own loopback alias
    assert [socket.gethostbyname(n) for n in ("node1", "node2")] == ["127.0.0.2", "127.0.0.3"]


def test_minpro_slurm_status_shows_state_and_exit_code_without_accounting(slurm_env, tmp_path, capsys):
    script = tmp_path / "fail.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/fail-%j.out\n#SBATCH --time=00:01:00\nexit 3\n")
    job = slurm_env.sbatch([str(script)])
    assert slurm_env.wait_job(job, timeout=60) == "FAILED"
    assert submit.main(["status", job]) == 1  # a failed job: exit status 1 for scripts
    out = capsys.readouterr().out
    assert out.startswith(f"{job} fail.sbatch: FAILED, exit code 3 (signal 0)"), out
    assert f"log {tmp_path}/fail-{job}.out" in out
    from minpro_megatron import cli

    assert cli.slurm_main(["status", "999999"]) == 2
    assert "job 999999 is not known to the controller" in capsys.readouterr().err

"""SLOW END-TO-END (issue 13 item 1): the user's multi-node job on the real single-host Slurm cluster.

`minpro-slurm submit` for a tiny Qwen3-MoE with one learner node and one CPU rollout node: node1
(127.0.0.2) runs torchrun with a TP2 gloo learner, node2 (127.0.0.3) runs two real SGLang CPU servers
and sglang-router from launch_slurm/rollout.sh; the trainer attaches through the URL files, pushes its
weights into both servers after every step with the distributed transport (a gloo group whose store is
at the learner node's address), compares each server's log-probs with its own (probe), and the job ends
COMPLETED with TensorBoard event files. The second test (item 2) is scancel of that job mid-run leaving
a checkpoint of its last step, and the resubmitted job resuming from it with servers synced to the
resumed step and probed before the first generation. The third (item 2) SIGKILLs one SGLang server
mid-run: restarted by rollout.sh, held out of the router, re-synced and probed by the trainer before it
serves again, with every prompt answered once (counted). Budget: <= 6 minutes on 2 cores (measured in the module's
report line); the cluster fixture is shared with the other tests/slurm modules.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from minpro_megatron.metrics.report import read_scalars
from tests.slurm.test_cluster_jobs import TINY, read_log, submit_job, wait_for
from tests.slurm.test_cluster_trainer import _rl_steps
from tests.train.test_trainer_local import QUICK

pytestmark = [pytest.mark.slurm, pytest.mark.sglang, pytest.mark.slow]


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports (servers take base, base+1, ...)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def multinode_args(model: Path, *extra: str) -> list[str]:
    base, router = _free_ports(2), _free_ports(2)
    return [
        "submit", TINY, *QUICK, f"model.hf_path={model}", "parallel.tensor=2",
        "slurm.program=train", "slurm.gpus_per_node=0", "slurm.procs_per_node=2", "slurm.time=00:15:00",
        "slurm.rollout_servers_per_node=2", "rollout.backend=sglang", "rollout.server_device=cpu",
        "rollout.server_dtype=float32", "rollout.weight_transport=distributed", "rollout.verify_threshold=1e-4",
        "rollout.staleness.n=1", f"rollout.base_port={base}", f"rollout.router_port={router}",
        "rollout.server_startup_timeout_s=600",  # two SGLang starts on 2 busy cores (~80 s each when idle)
        "--nodes", "1", "--rollout-nodes", "1", *extra,
    ]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir

    _, _, path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "qwen3-moe", seed=1, dtype="float32",
                                     initializer_range=0.125)
    return path


def test_learner_node_and_cpu_rollout_node_end_to_end(slurm_env, tmp_path, tiny_hf):
    run = tmp_path / "run"
    (job,) = submit_job(run, *multinode_args(tiny_hf))
    state = slurm_env.wait_job(job, timeout=900)
    log = read_log(run)
    assert state == "COMPLETED", log
    assert slurm_env.job_info(job)["ExitCode"] == "0:0"
    (fleet,) = (run / "rollout").iterdir()
    urls = (fleet / "server_urls.txt").read_text().split()
    # the rollout node (node2 = 127.0.0.3) served on its own address; the learner node is 127.0.0.2
    assert len(urls) == 2 and all(u.startswith("http://127.0.0.3:") for u in urls), urls
    assert (fleet / "router_url.txt").read_text().startswith("http://127.0.0.3:")
    assert "[netif] node1: node address 127.0.0.2 toward node1" in log  # learner.sh
    assert "[netif] node2: node address 127.0.0.3 toward node1" in log  # rollout.sh
    for i in (0, 1):  # real SGLang on the CPU engine, started from rollout.sh
        server_log = (fleet / f"server-node2-{i}.log").read_text()
        assert "'device': 'cpu'" in server_log and "'attention_backend': 'torch_native'" in server_log, server_log[-2000:]
        # the distributed transport: one update group (store at the learner node's MINPRO_NODE_IP, netif line
        # above), then one broadcast per sync: the start-up sync and one after each of the 3 steps
        assert server_log.count("POST /init_weights_update_group") == 1, server_log[-2000:]
        assert server_log.count("POST /update_weights_from_distributed") >= 4, server_log[-2000:]
    # the trainer synced its step-0 weights into both attached servers and probed them before generating
    assert "[sglang] 2 attached server(s) synced to step 0 before the first generation" in log
    scalars = read_scalars(run / "output" / "tb")
    assert list((run / "output" / "tb").glob("events.out.tfevents*"))
    assert [s for s, _ in scalars["rollout/reward_mean"]] == [1, 2, 3]
    # every step pushed the TP2 learner's weights into both servers and probed both (fp32: exact)
    assert [s for s, _ in scalars["sync/bytes"]] == [1, 2, 3] and all(v > 0 for _, v in scalars["sync/bytes"])
    assert all(v == 2 for _, v in scalars["sync/verify_probed_servers"])
    assert max(v for _, v in scalars["sync/verify_max_abs_logprob_diff"]) < 1e-4
    assert [v for _, v in scalars["rollout/staleness_mean"]] == [0.0, 1.0, 1.0]
    assert (run / "output" / "summary.md").is_file()


def _metrics_rows(run: Path) -> list[dict]:
    f = run / "output" / "tb" / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def test_scancel_then_resubmit_resumes_with_synced_servers(slurm_env, tmp_path, tiny_hf):
    """Issue 13 item 2: scancel while the learner is mid-run. Slurm's TERM reaches every process of the job at
    once, so the SGLang servers die while the learner's step is in flight; the learner completes what it can
    without them (train/trainer.py _stop_tolerant) and saves its last complete step. The resubmitted job
    resumes from that checkpoint and syncs the fresh servers to it (probe) before its first generation."""
    run = tmp_path / "run"
    (job,) = submit_job(run, *multinode_args(tiny_hf, "train.steps=12"))
    wait_for(lambda: len(_rl_steps(run)) >= 2, 900, "two RL steps")
    slurm_env._client(["scancel", job])
    assert slurm_env.wait_job(job, timeout=120) == "CANCELLED"
    log = read_log(run)
    ckpts = run / "checkpoints"
    tracker = ckpts / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), log
    saved = int(tracker.read_text())  # the trainer finished its step and saved on SIGTERM before exiting
    done = _rl_steps(run)
    # the checkpoint is of the last RL step the cancelled job completed (logged), and it is complete:
    # committed under its final name, nothing left in staging
    assert 2 <= saved < 12 and done[-1] == saved, (saved, done, log)
    assert (ckpts / f"iter_{saved:07d}").is_dir() and not list(ckpts.glob("*.tmp")), sorted(ckpts.iterdir())
    assert f"stop requested (SIGTERM): saving at RL step {saved}" in log, log
    # where the servers died before the step's generation of later batches was joined, that batch is lost and
    # the resumed run generates it again (from the same prompts) with its live weights: staleness 0 once
    lost = "the generation of the later steps' batches failed" in log
    # resubmitted: new ports and a new per-job key (both may change on resume), same run directory
    (job2,) = submit_job(run, *multinode_args(tiny_hf, "train.steps=12"))
    assert slurm_env.wait_job(job2, timeout=900) == "COMPLETED", read_log(run)
    log = read_log(run)
    assert f"resuming from {ckpts} (iteration {saved})" in log
    assert f"resumed from {ckpts} at RL step {saved}" in log
    # the fresh servers booted step-0 weights; the resumed trainer pushed step `saved` into both and probed
    # them before its first generation (fp32: the probe matches the learner exactly)
    m = re.search(rf"\[sglang\] 2 attached server\(s\) synced to step {saved} before the first generation; "
                  r"probe max \|logp diff\| (\S+) on 2 server\(s\)", log)
    assert m and float(m.group(1)) < 1e-4, log
    fleet = run / "rollout" / job2
    for i in (0, 1):
        server_log = (fleet / f"server-node2-{i}.log").read_text()
        served = server_log[server_log.index("The server is fired up and ready to roll"):]  # after SGLang's warm-up
        first_sync = served.find("POST /update_weights_from_distributed")
        assert 0 <= first_sync < served.find("POST /generate"), served[:3000]
    assert int(tracker.read_text()) == 12
    steps = _rl_steps(run)
    assert steps == list(range(1, 13)), steps  # the RL step continued from `saved`; nothing logged twice
    rows = {r["step"]: r for r in _metrics_rows(run) if "rollout/reward_mean" in r}
    # exact delay n=1 across the resume: the batch generated before the cancel came back with the checkpoint,
    # or (lost with the servers) was generated again by the resumed weights
    assert rows[saved + 1]["rollout/staleness_mean"] == (0.0 if lost else 1.0), (lost, rows[saved + 1])
    assert rows[saved + 1].get("rollout/regenerated_batches", 0.0) == (1.0 if lost else 0.0)
    assert all(rows[s]["rollout/staleness_mean"] == 1.0 for s in range(saved + 2, 13))
    sync = read_scalars(run / "output" / "tb")["sync/verify_max_abs_logprob_diff"]
    assert max(v for s, v in sync if s > saved) < 1e-4


def _server_process(port: str):
    """The SGLang server process (launched by rollout.sh on node2) that serves ``port``."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "sglang.launch_server" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return p
    return None


def test_server_killed_mid_run_is_restarted_resynced_and_loses_no_prompt(slurm_env, tmp_path, tiny_hf):
    """Issue 13 item 2: one SGLang server of the running job is SIGKILLed. rollout.sh takes it out of the router
    and restarts it on its port (boot weights, labelled "restarted"); the trainer syncs the other server
    meanwhile, then rebuilds the update group with the restarted one, syncs and probes it, and gives it back
    to the router. Every step trains on all of its prompts, each answered once (counted)."""
    run = tmp_path / "run"
    steps = 30
    (job,) = submit_job(run, *multinode_args(tiny_hf, f"train.steps={steps}"))
    wait_for(lambda: len(_rl_steps(run)) >= 2, 900, "two RL steps")
    (fleet,) = (run / "rollout").iterdir()
    urls = (fleet / "server_urls.txt").read_text().split()
    port = urls[1].rsplit(":", 1)[1]
    victim = _server_process(port)
    assert victim is not None, urls
    killed_at = len(_rl_steps(run))
    victim.kill()
    assert slurm_env.wait_job(job, timeout=1200) == "COMPLETED", read_log(run)
    log = read_log(run)
    assert f"server 1 (127.0.0.3:{port}) exited with 137; restart 1/3 on the same port" in log, log
    assert f"{urls[1]} taken out of the router" in log, log
    assert f"{urls[1]} holds step-" in log and "weights again: back in generation" in log, log
    server_log = (fleet / "server-node2-1.log").read_text()
    restarted = server_log[server_log.index("===== restart 1 (server 1 exited with 137) ====="):]
    served = restarted[restarted.index("The server is fired up and ready to roll"):]
    # the restarted process joined a new update group and got the current weights before any generation
    first_sync = served.find("POST /update_weights_from_distributed")
    assert 0 <= served.find("POST /init_weights_update_group") < first_sync < served.find("POST /generate"), served[:3000]
    rows = {r["step"]: r for r in _metrics_rows(run) if "rollout/reward_mean" in r}
    assert sorted(rows) == list(range(1, steps + 1))
    # QUICK: 8 prompts x 4 samples per step, each prompt answered exactly once, through the kill and the restart
    assert all(rows[s]["rollout/prompts"] == 8 and rows[s]["rollout/samples"] == 32 for s in rows), rows
    probed = [(s, v) for s, v in read_scalars(run / "output" / "tb")["sync/verify_probed_servers"]]
    assert any(v == 1 for s, v in probed if s > killed_at), probed  # synced and probed the survivor meanwhile
    assert probed[-1][1] == 2, probed  # both again by the end
    sync = read_scalars(run / "output" / "tb")["sync/verify_max_abs_logprob_diff"]
    assert max(v for _, v in sync) < 1e-4  # every server it probed held the learner's weights (fp32: exact)
    retries = sum(r.get("rollout/request_retries", 0.0) for r in rows.values())
    print(f"killed after step {killed_at}; {retries:.0f} request(s) retried; probed servers per step: {probed}")

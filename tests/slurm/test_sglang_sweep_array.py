"""SLOW END-TO-END (issue 13 item 3): a sweep as a Slurm job array whose tasks use the SGLang backend, then
the collector's table.

`minpro-slurm sweep --methods grpo,minpro --staleness 1` on the real single-host Slurm cluster: each of the 2
array tasks is the multi-node job of tests/slurm/test_multinode_sglang_job.py (a TP2 gloo learner on node1 =
127.0.0.2, a real SGLang CPU server and sglang-router on node2 = 127.0.0.3 started by rollout.sh), with its
own run directory, URL files and API key; the trainer attaches to its task's server, pushes its weights
every step with the distributed transport and probes them. The collector job (afterany on the array) runs
the default `minpro_megatron.sweep collect` and writes the sweep table (md + csv) and plots. The two tasks
run at the same time on the same two nodes (slurm.exclusive=false, one CPU each), so their servers and
routers share node2's address and must not share a port (task k shifts its ports); one server per
rollout node keeps the memory and start-up cost near the single job's. Every setting the test relies on is an explicit override
(backend, loss, ports, transport), not the example config's defaults.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import pytest
import yaml

from minpro_megatron.metrics.report import read_scalars
from tests.slurm.test_cluster_jobs import TINY, read_log, submit_job
from tests.slurm.test_multinode_sglang_job import _free_ports, tiny_hf  # noqa: F401 - tiny_hf is a fixture
from tests.train.test_trainer_local import QUICK

pytestmark = [pytest.mark.slurm, pytest.mark.sglang, pytest.mark.slow]

TASKS = [("grpo-n1", "grpo"), ("minpro-n1", "minpro")]  # array index -> (task name, loss.name), tasks.txt order
STEPS = [1, 2, 3]  # QUICK's train.steps=3


def sweep_args(model: Path) -> tuple[int, int, list[str]]:
    base = _free_ports(len(TASKS))  # task k: server on base + k, router on router + 2k (+1: its metrics)
    router = _free_ports(2 * len(TASKS))
    while base - 2 * len(TASKS) < router < base + len(TASKS):
        router = _free_ports(2 * len(TASKS))
    return base, router, [
        "sweep", TINY, *QUICK, f"model.hf_path={model}", "parallel.tensor=2", "loss.name=grpo",
        "slurm.program=train", "slurm.gpus_per_node=0", "slurm.procs_per_node=2", "slurm.time=00:15:00",
        "slurm.exclusive=false", "slurm.cpus_per_node=1",  # both tasks at once, sharing the two nodes
        "slurm.rollout_servers_per_node=1", "rollout.backend=sglang", "rollout.use_router=true",
        "rollout.server_device=cpu", "rollout.server_dtype=float32", "rollout.weight_transport=distributed",
        "rollout.verify_threshold=1e-4", "rollout.staleness.mode=exact", f"rollout.base_port={base}",
        f"rollout.router_port={router}", "rollout.server_startup_timeout_s=600",
        "--nodes", "1", "--rollout-nodes", "1", "--methods", ",".join(m for _, m in TASKS), "--staleness", "1",
    ]


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def _wait_tasks(cluster, array: str, n: int, timeout: float) -> dict[int, str]:
    """Each array task's final state, polled while the controller still holds it (MinJobAge is 4 s here,
    so a task's record is gone soon after it ends: waiting for the collector first would lose it)."""
    final: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(final) < n:
        for i in set(range(n)) - set(final):
            state = cluster.job_state(f"{array}_{i}")
            if state in TERMINAL:
                final[i] = state
        if time.monotonic() > deadline:
            raise TimeoutError(f"array {array}: tasks {sorted(set(range(n)) - set(final))} not finished")
        time.sleep(0.5)
    return final


def _task_log(run: Path, array: str, index: int) -> str:
    (log,) = (run / "logs").glob(f"*-{array}_{index}.out")  # --output=%x-%A_%a.out
    return log.read_text()


def test_sweep_array_of_sglang_jobs_then_collector_table(slurm_env, tmp_path, tiny_hf):  # noqa: F811
    run = tmp_path / "sweep"
    base, router_port, args = sweep_args(tiny_hf)
    array, collector = submit_job(run, *args)
    assert slurm_env.job_info(collector)["Dependency"].startswith(f"afterany:{array}")
    states = _wait_tasks(slurm_env, array, len(TASKS), timeout=1800)
    slurm_env.wait_job(collector, timeout=300)
    log = read_log(run)
    assert states == {i: "COMPLETED" for i in range(len(TASKS))}, (states, log)
    assert [t.split()[0] for t in (run / "tasks.txt").read_text().splitlines()] == [n for n, _ in TASKS]
    for index, (name, method) in enumerate(TASKS):
        task, task_log = run / "runs" / name, _task_log(run, array, index)
        assert "learner exited with 0" in task_log, task_log[-3000:]
        assert (task / "overrides.txt").read_text().split() == [f"loss.name={method}", "rollout.staleness.n=1"]
        # the task's own fleet: URL files under ITS run directory, keyed by ITS Slurm job id, served on node2
        (fleet,) = (task / "rollout").iterdir()
        assert task_log.split("\n", 2)[1].split()[2] == fleet.name, task_log[:500]  # "[T] job ID (restart 0) ..."
        # array task k shifts its ports (a node shared by tasks never sees a clash): base + k, router + 2k
        urls = (fleet / "server_urls.txt").read_text().split()
        router = (fleet / "router_url.txt").read_text().strip()
        assert urls == [f"http://127.0.0.3:{base + index}"] and router == f"http://127.0.0.3:{router_port + 2 * index}"
        # the trainer of this task ran with this method and attached to exactly these URLs (its resolved config)
        cfg = yaml.safe_load((task / "output" / "config.yaml").read_text())
        assert cfg["loss"]["name"] == method and cfg["rollout"]["backend"] == "sglang"
        assert cfg["rollout"]["server_urls"] == urls and cfg["rollout"]["router_url"] == router
        assert cfg["rollout"]["api_key_file"] == str(fleet / "api_key")
        assert f"sweep task {index}: {name}: loss.name={method} rollout.staleness.n=1" in task_log
        assert "[sglang] 1 attached server(s) synced to step 0 before the first generation" in task_log, task_log[-3000:]
        # real SGLang on the CPU engine; the distributed transport: one update group, then a broadcast per sync:
        # the attach sync, the warm-started policy (QUICK: 2 supervised steps) and one after each RL step
        # (only this task's trainer talks to this server: its ports are the task's own)
        server_log = (fleet / "server-node2-0.log").read_text()
        assert "'device': 'cpu'" in server_log and "'attention_backend': 'torch_native'" in server_log, server_log[-2000:]
        assert server_log.count("POST /init_weights_update_group") == 1, server_log[-2000:]
        assert server_log.count("POST /update_weights_from_distributed") == 2 + len(STEPS), server_log[-2000:]
        # metrics: every step pushed weights and probed the one server (fp32: exact)
        scalars = read_scalars(task / "output" / "tb")
        assert [s for s, _ in scalars["rollout/reward_mean"]] == STEPS
        assert [s for s, _ in scalars["sync/bytes"]] == STEPS and all(v > 0 for _, v in scalars["sync/bytes"])
        assert [v for _, v in scalars["sync/verify_probed_servers"]] == [1.0] * len(STEPS)
        assert max(v for _, v in scalars["sync/verify_max_abs_logprob_diff"]) < 1e-4
        assert [v for _, v in scalars["rollout/staleness_mean"]] == [0.0, 1.0, 1.0]
    # the tasks really ran at once (else the port shift above was not exercised): both began before either ended
    begun = [(run / "runs" / n / "overrides.txt").stat().st_mtime for n, _ in TASKS]
    ended = [(run / "runs" / n / "output" / "summary.md").stat().st_mtime for n, _ in TASKS]
    assert max(begun) < min(ended), (begun, ended)
    # the collector: after both tasks (afterany), default command, one row per task with finite values
    assert slurm_env.job_state(collector) == "COMPLETED", log
    table_md, table_csv = run / "sweep_table.md", run / "sweep_table.csv"
    last_task_output = max(p.stat().st_mtime for n, _ in TASKS for p in (run / "runs" / n / "output").rglob("*"))
    assert table_md.stat().st_mtime >= last_task_output
    md = table_md.read_text()
    assert "2 finished runs" in md and "| grpo | 1 |" in md and "| minpro | 1 |" in md, md
    rows = list(csv.DictReader(table_csv.open()))
    assert sorted((r["method"], r["staleness"]) for r in rows) == [("grpo", "1"), ("minpro", "1")], rows
    assert rows[0]["kl_k3"] != rows[1]["kl_k3"]  # two runs, not one counted twice
    for r in rows:
        for col in ("acc_start", "acc_final", "reward_auc", "kl_k3", "clip_high", "rho_min_mean", "entropy"):
            assert math.isfinite(float(r[col])), (col, r)
    runs = {r["name"]: r for r in csv.DictReader((run / "sweep_runs.csv").open())}
    assert sorted(runs) == sorted(n for n, _ in TASKS)
    assert (run / "sweep_rollout_reward_mean.png").stat().st_size > 1000

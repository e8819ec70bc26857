"""The RL trainer itself through the generated Slurm jobs on the real single-host cluster: torchrun across
2 emulated nodes (gloo), a 2-task sweep array whose collector writes the sweep table, and scancel of a
running training job leaving a checkpoint that the resubmitted job resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm.test_cluster_jobs import TINY, read_log, submit_job, wait_for
from tests.train.test_trainer_local import QUICK

pytestmark = pytest.mark.slurm

# one learner process per emulated node, no GPUs: a 2-rank gloo job (DP 2)
NODES = ["slurm.program=train", "slurm.gpus_per_node=0", "slurm.procs_per_node=1", "slurm.time=00:10:00"]


def _rl_steps(run: Path) -> list[int]:
    f = run / "output" / "tb" / "metrics.jsonl"
    if not f.is_file():
        return []
    return [r["step"] for r in map(json.loads, f.read_text().splitlines()) if "rollout/reward_mean" in r]


def test_trainer_across_two_nodes(slurm_env, tmp_path):
    run = tmp_path / "run"
    (job,) = submit_job(run, "submit", TINY, *NODES, *QUICK, "--nodes", "2")
    state = slurm_env.wait_job(job, timeout=420)
    log = read_log(run)
    assert state == "COMPLETED", log
    assert slurm_env.job_info(job)["ExitCode"] == "0:0"
    assert _rl_steps(run) == [1, 2, 3]
    assert (run / "output" / "summary.md").is_file() and (run / "output" / "plot.png").is_file()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"
    config = (run / "output" / "config.yaml").read_text()
    assert "checkpoint" in config and str(run / "checkpoints") in config


def test_sweep_of_the_trainer_then_collector_table(slurm_env, tmp_path):
    run = tmp_path / "sweep"
    array, collector = submit_job(run, "sweep", TINY, *NODES, *QUICK, "train.steps=2", "--nodes", "1",
                                  "--methods", "cispo,minpro", "--staleness", "1")
    for job in (array, collector):
        slurm_env.wait_job(job, timeout=600)
    log = read_log(run)
    assert slurm_env.job_state(collector) == "COMPLETED", log
    table = (run / "sweep_table.md").read_text()
    assert "| cispo | 1 |" in table and "| minpro | 1 |" in table
    assert (run / "sweep_rollout_reward_mean.png").is_file()


def test_scancel_leaves_a_resumable_checkpoint(slurm_env, tmp_path):
    run = tmp_path / "run"
    long = [*NODES, *QUICK, "train.steps=60", "--nodes", "1"]
    (job,) = submit_job(run, "submit", TINY, *long)
    wait_for(lambda: len(_rl_steps(run)) >= 2, 300, "two RL steps")
    slurm_env._client(["scancel", job])
    assert slurm_env.wait_job(job, timeout=120) == "CANCELLED"
    tracker = run / "checkpoints" / "latest_checkpointed_iteration.txt"
    saved = int(tracker.read_text())  # the trainer saved on SIGTERM before exiting
    assert 2 <= saved < 60
    assert f"stop requested" in read_log(run)
    (job2,) = submit_job(run, "submit", TINY, *long)
    assert slurm_env.wait_job(job2, timeout=420) == "COMPLETED", read_log(run)
    log = read_log(run)
    assert f"resuming from {run / 'checkpoints'} (iteration {saved})" in log
    assert f"at RL step {saved}" in log
    assert int(tracker.read_text()) == 60

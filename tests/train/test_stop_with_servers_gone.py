"""A stop request whose rollout servers are already gone (issue 13 item 2, the learner's side).

Slurm's TERM (scancel, preemption) reaches every process of a job at once: the SGLang servers die while
the learner is mid-step. The trainer then saves the last step it can complete without a half-updated
state (train/trainer.py ``_stop_tolerant``, train/batch_source.py ``abort_step`` / ``drop_inflight``):
- the generation of later steps' batches fails after the update: the step completes and is saved, the
  lost batch's prompts go back to the stream, and the resumed run generates that batch again, from the
  same prompts, with its live weights (no prompt lost or duplicated; staleness 0 for that one step);
- the generation the step itself needs fails (before the update): the step is abandoned, the state
  before it is saved;
- without a stop request a failure stays an error.
Real learner and local engine on gloo; the servers' failure is the one thing faked: the rollout (or the
weight push) raises on rank 0 through the same rank-0 phase (parallel/rank0.py) as the SGLang engine's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.mp_utils import MultiprocessError, run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY

pytestmark = pytest.mark.multiproc
BATCH = 8  # QUICK's train.rollout_batch_size: prompts taken from the stream per batch


def _train(argv: list[str], stop_file: str, fail: str | None, at: int, cancelled: bool = True) -> int:
    """One rank of the trainer with a Slurm job's stop file. ``fail``: 'rollout' makes the ``at``-th rollout
    collection (Rollouts.finish) fail, 'sync' the weight sync to step ``at``; with ``cancelled`` the job was
    cancelled just before (the job script's TERM trap wrote the stop file)."""
    os.environ["MINPRO_STOP_FILE"] = stop_file
    from minpro_megatron.parallel.rank0 import rank0_phase
    from minpro_megatron.rollout.local_engine import LocalEngine
    from minpro_megatron.train.rollouts import Rollouts
    from minpro_megatron.train.trainer import main

    def servers_gone(what: str) -> None:
        if cancelled:
            Path(stop_file).write_text("TERM")

        def call():
            raise ConnectionError("connection refused: the rollout servers are gone")

        rank0_phase(what, call)

    finish, update_weights, calls = Rollouts.finish, LocalEngine.update_weights, [0]

    def failing_finish(self, started):
        calls[0] += 1
        if fail == "rollout" and calls[0] == at:
            servers_gone("SGLang rollout")
        return finish(self, started)

    def failing_update(self, version: int, defer_probe: bool = False):
        if fail == "sync" and version == at:
            servers_gone(f"weight sync to step {version}")
        return update_weights(self, version, defer_probe)

    Rollouts.finish, LocalEngine.update_weights = failing_finish, failing_update
    return main(argv)


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "tb" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "rollout/reward_mean" in r}


def _rank_state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"iter_{step:07d}" / "rank_state_00000.pt", weights_only=False)


def _argv(out: Path, *extra: str) -> list[str]:
    # no warm start: the prompt stream then serves RL batches only (its position counts them)
    return [str(TINY), *QUICK, "train.warm_start_steps=0", "train.eval_interval=0", f"logging.output_dir={out}", *extra]


def test_lost_generation_after_the_update_saves_the_step_and_regenerates_the_batch(tmp_path) -> None:
    out, stop = tmp_path / "run", tmp_path / "stop_requested"
    argv = _argv(out, "train.steps=4", "rollout.staleness.n=1", "checkpoint.save_interval=4")
    # n=1: collection 1 is step 1's batch, 2 step 2's (joined in step 1), 3 step 3's (joined in step 2): lost
    assert run_multiprocess(_train, 2, argv, str(stop), "rollout", 3, timeout=900) == [0, 0]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert sorted(_rows(out)) == [1, 2]  # step 2 updated, logged and saved
    state = _rank_state(out, 2)
    # the lost batch's 8 prompts went back to the stream: taken are step 1's and step 2's batches only
    assert state["stream"]["position"] == 2 * BATCH and state["pending"] == {}
    stop.unlink()  # a new job's script removes it
    assert run_multiprocess(_train, 2, argv, str(stop), None, 0, timeout=900) == [0, 0]
    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3, 4]
    # step 3's batch was generated again by version 2 (the live one at resume), step 4's by version 3 as usual
    assert [rows[s]["rollout/staleness_mean"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]
    assert rows[3]["rollout/regenerated_batches"] == 1.0
    # every prompt once, in order: 4 steps + the one batch ahead = 5 batches, as in an uninterrupted run
    assert _rank_state(out, 4)["stream"]["position"] == 5 * BATCH


def test_lost_generation_before_the_update_abandons_the_step(tmp_path) -> None:
    out, stop = tmp_path / "run", tmp_path / "stop_requested"
    argv = _argv(out, "train.steps=3", "rollout.staleness.n=0", "checkpoint.save_interval=0")
    # n=0: every step generates its own batch before its update; step 2's fails
    assert run_multiprocess(_train, 1, argv, str(stop), "rollout", 2, timeout=600) == [0]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(_rows(out)) == [1]
    state = _rank_state(out, 1)
    assert state["stream"]["position"] == BATCH and state["rl_step"] == 1  # step 2's prompts are back


def test_failed_sync_after_a_stop_request_saves_the_complete_step(tmp_path) -> None:
    out, stop = tmp_path / "run", tmp_path / "stop_requested"
    argv = _argv(out, "train.steps=3", "rollout.staleness.n=1", "checkpoint.save_interval=0")
    assert run_multiprocess(_train, 1, argv, str(stop), "sync", 2, timeout=600) == [0]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(_rows(out)) == [1, 2]
    # the batch joined before the failed sync is kept (the next step's, generated by version 1): exact delay
    # holds on resume
    assert list(_rank_state(out, 2)["pending"]) == ["2"]


@pytest.mark.parametrize("fail,at,phase", [("rollout", 2, "SGLang rollout"), ("sync", 1, "weight sync to step 1")])
def test_failure_without_a_stop_request_is_still_an_error(tmp_path, fail, at, phase) -> None:
    out = tmp_path / "run"
    argv = _argv(out, "train.steps=2", "rollout.staleness.n=1", "checkpoint.save_interval=0")
    with pytest.raises(MultiprocessError, match=f"{phase} failed on rank 0"):
        run_multiprocess(_train, 1, argv, str(tmp_path / "stop"), fail, at, False, timeout=600)
    assert not (out / "checkpoints" / "latest_checkpointed_iteration.txt").exists()

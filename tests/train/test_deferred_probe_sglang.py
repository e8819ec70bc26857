"""The post-sync probe of an in-flight weight update (rollout.partial) runs in the background
(rollout/deferred_probe.py) and is checked before the learner trains the batch that holds tokens of the
probed version (train/trainer.py ``_check_probe``), on a real SGLang CPU server.

The failing run corrupts the weights the sync to step 2 pushes (every exported tensor scaled by 1.5, a
real fault the probe must catch, injected into the exporter's buckets in the trainer's process). With the
probe deferred, the sync to step 2 returns and step 2's row is logged; the failure then surfaces in the next
step, after its batch (generated across that sync) is collected and before the learner trains it: the
learner's train_step ran for steps 0 and 1 only, and the run ends with WeightVerificationError naming step
2 with the push's stats attached. (The synchronous probe raised inside the sync to step 2, before step 2's
row was logged: this test fails there on ``sync/bytes``.)

Set-up as tests/train/test_trainer_partial_sglang.py (slowed server, one request at a time), so the run-ahead
batch is still decoding at each sync.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY
from tests.train.test_trainer_partial_sglang import _free_port, _slow_down_when_up

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]

CORRUPT_AT = 2


def _argv(out: Path, port: int, steps: int) -> list[str]:
    return [
        str(TINY), *QUICK, f"logging.output_dir={out}", f"train.steps={steps}", "rollout.max_new_tokens=32",
        "train.eval_interval=0", "data.num_eval=4", "checkpoint.save_interval=0",
        "rollout.backend=sglang", "rollout.num_servers=1", "rollout.use_router=false", "rollout.server_dtype=float32",
        f"rollout.base_port={port}", "rollout.verify_threshold=1e-4", "rollout.max_concurrency=1",
        "rollout.partial=true", "rollout.pause_mode=retract", "rollout.staleness.mode=bounded", "rollout.staleness.n=1",
    ]


def _run(argv: list[str], corrupt_at: int | None, crash_at: int | None = None) -> dict:
    """One rank: the trainer, with the sync to step ``corrupt_at`` pushing corrupted weights, or an error
    right after the sync to step ``crash_at`` (its probe in flight). Returns the RL steps at which the
    learner trained, the error and its attributes, the probe left unchecked and the threads left after close."""
    from minpro_megatron.config import load_config
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.rollout.deferred_probe import THREAD_NAME
    from minpro_megatron.train.trainer import RLTrainer
    from minpro_megatron.weights import verify

    sent = verify.server_probe_logprobs

    def spy_probe(url, prompt_ids, max_new_tokens, *a, **k):  # the real request; records the form it takes
        out["probe_max_new_tokens"].append(max_new_tokens)
        return sent(url, prompt_ids, max_new_tokens, *a, **k)

    verify.server_probe_logprobs = spy_probe

    cfg = load_config(argv[0], argv[1:])
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    out: dict = {"trained_at": [], "error": None, "probe_max_new_tokens": []}
    try:
        trainer = RLTrainer(cfg)
        try:
            train_step, buckets = trainer.learner.train_step, trainer.engine.exporter.buckets

            def spy_train_step(samples):  # the real update; records when it ran
                out["trained_at"].append(trainer.rl_step)
                return train_step(samples)

            def corrupted_buckets(*a, **k):
                for bucket in buckets(*a, **k):
                    if trainer.warm.done and trainer.rl_step == corrupt_at:
                        bucket = [(name, t * 1.5) for name, t in bucket]
                    yield bucket

            evaluate = trainer.evaluate

            def crashing_evaluate():  # runs after the step's sync
                if trainer.rl_step == crash_at:
                    out["unchecked_probe"] = getattr(trainer.engine._deferred, "version", None)
                    raise RuntimeError(f"crash after the sync to step {crash_at}")
                return evaluate()

            trainer.learner.train_step = spy_train_step
            trainer.evaluate = crashing_evaluate
            trainer.engine.exporter.buckets = corrupted_buckets
            try:
                trainer.run()
            except Exception as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)
                out["sync_result_version"] = getattr(getattr(exc, "sync_result", None), "version", None)
                out["rl_step_at_error"] = trainer.rl_step
        finally:
            trainer.close()
    finally:
        destroy_distributed(ctx)
    out["threads_left"] = [t.name for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tb" / "metrics.jsonl").read_text().splitlines()]


def _run_slowed(tmp_path: Path, steps: int, corrupt_at: int | None, crash_at: int | None = None,
                extra: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    out, port = tmp_path / "run", _free_port()
    done, ok = threading.Event(), []
    slower = threading.Thread(target=_slow_down_when_up, args=(f"http://127.0.0.1:{port}", done, ok), daemon=True)
    slower.start()
    try:
        (result,) = run_multiprocess(_run, 1, [*_argv(out, port, steps), *extra], corrupt_at, crash_at, timeout=900)
    finally:
        done.set()
    assert ok, "the server was never slowed down"
    return result, _rows(out)


def test_a_failing_deferred_probe_stops_the_run_before_the_affected_batch_trains(tmp_path) -> None:
    result, rows = _run_slowed(tmp_path, steps=4, corrupt_at=CORRUPT_AT)
    print(result)
    assert result["error"] == "WeightVerificationError", result
    assert f"weight sync to step {CORRUPT_AT}" in result["message"]
    # the sync to step 2 returned (its row is logged) and the next step stopped before training its batch
    assert [r["step"] for r in rows if "sync/bytes" in r] == [1, CORRUPT_AT]
    assert result["rl_step_at_error"] == CORRUPT_AT
    assert result["trained_at"] == [0, 1]
    assert result["sync_result_version"] == CORRUPT_AT  # the push's stats ride on the error
    probed = {r["step"]: r["sync/verify_max_abs_logprob_diff"] for r in rows if "sync/verify_max_abs_logprob_diff" in r}
    assert probed[1] < 1e-4 and float(probed[CORRUPT_AT]) > 1e-4  # both probes logged at the step they probed
    assert result["threads_left"] == []


def test_deferred_probes_are_all_checked_and_logged(tmp_path) -> None:
    result, rows = _run_slowed(tmp_path, steps=3, corrupt_at=None)
    assert result["error"] is None, result
    assert result["trained_at"] == [0, 1, 2]
    probed = {r["step"]: r for r in rows if "sync/verify_max_abs_logprob_diff" in r}
    assert sorted(probed) == [1, 2, 3]  # the last sync's probe too, checked at the end of the run
    assert all(r["sync/verify_max_abs_logprob_diff"] < 1e-4 and r["sync/verify_probed_servers"] == 1 for r in probed.values())
    waits = [r["time/probe_wait_s"] for r in rows if "time/probe_wait_s" in r]
    assert len(waits) == 3
    # the start-up sync's probe is synchronous (greedy, 8 tokens); the three deferred ones are prefill-only, with
    # no decode step to wait behind the resumed rollouts
    assert result["probe_max_new_tokens"] == [8, 0, 0, 0], result["probe_max_new_tokens"]
    assert result["threads_left"] == []


def test_a_run_that_fails_with_a_probe_in_flight_closes_without_hanging(tmp_path) -> None:
    result, _ = _run_slowed(tmp_path, steps=4, corrupt_at=None, crash_at=2, extra=("train.eval_interval=1",))
    assert result["error"] == "RuntimeError" and "crash after the sync to step 2" in result["message"], result
    assert result["unchecked_probe"] == 2  # the sync to step 2 had returned with its probe in flight
    assert result["threads_left"] == []  # close() stopped the servers and let the probe thread end

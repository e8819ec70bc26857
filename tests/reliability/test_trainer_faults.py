"""Trainer faults with the local engine (issue 12): resume keeps every metric and refuses a checkpoint of
another config, extending train.steps works; a NaN gradient is skipped and counted, too many in a row stop
the run and nothing non-finite is saved; over-long dataset rows are dropped at load; a batch that does not
split over DP ranks fails before anything starts; a stop request during the warm start is honoured."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import MultiprocessError, run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = pytest.mark.multiproc


def _jsonl_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _summary_points(run: Path, tag: str) -> int:
    for line in (run / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == tag:
            return int(cells[-1])
    raise AssertionError(f"{tag} not in summary.md")


def test_resume_keeps_metrics_extends_steps_and_refuses_another_config(tmp_path) -> None:
    out = tmp_path / "run"
    base = [str(TINY), *QUICK, "train.warm_start_steps=5", "train.steps=2", "checkpoint.save_interval=2",
            "train.eval_interval=0", f"logging.output_dir={out}"]
    assert run_multiprocess(run_trainer, 1, base, timeout=600) == [0]
    jsonl = out / "tb" / "metrics.jsonl"
    with open(jsonl, "a") as f:  # a killed run logged a step past its last checkpoint
        f.write(json.dumps({"step": 3, "rollout/reward_mean": 9.0}) + "\n")

    # a second `make demo`: the finished run resumes at its last step and keeps every point
    assert run_multiprocess(run_trainer, 1, base, timeout=600) == [0]
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["rollout/reward_mean"]] == [1, 2]
    assert [s for s, _ in scalars["warm_start/nll"]] == [0, 4]  # its own step axis, not purged by the RL resume
    assert _jsonl_steps(jsonl) == [0, 1, 2]
    assert _summary_points(out, "rollout/reward_mean") == 2

    # extending the finished run (today: an assertion inside megatron's LR scheduler)
    assert run_multiprocess(run_trainer, 1, [*base, "train.steps=3"], timeout=600) == [0]
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["rollout/reward_mean"]] == [1, 2, 3]
    assert [s for s, _ in scalars["warm_start/nll"]] == [0, 4]
    assert _jsonl_steps(jsonl) == [0, 1, 2, 3]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert _summary_points(out, "rollout/reward_mean") == 3

    # another learning rate is another experiment: refused, naming the field and both values
    with pytest.raises(MultiprocessError, match=r"loss\.name: checkpoint 'minpro', now 'cispo'; optim\.lr: checkpoint 0\.0001, now 0\.0002"):
        run_multiprocess(run_trainer, 1, [*base, "train.steps=4", "optim.lr=2e-4", "loss.name=cispo"], timeout=600)


@contextlib.contextmanager
def nan_gradient(learner):
    """Inject a NaN into one parameter's gradient during the backward pass (before DDP accumulates it)."""
    param = next(p for p in learner.model[0].parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: g * math.nan)
    try:
        yield
    finally:
        handle.remove()


def _nan_run(out: str) -> dict:
    import torch

    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.train.trainer import NonFiniteError, RLTrainer

    cfg = load_config(TINY, [*QUICK, "train.warm_start_steps=0", "train.steps=5", "checkpoint.save_interval=1",
                             "train.max_nonfinite_skips=1", "train.eval_interval=0", f"logging.output_dir={out}"])
    init_distributed(cfg.parallel, seed=0)
    trainer = RLTrainer(cfg)
    clean = trainer.learner.train_step

    def poisoned(*a, **kw):  # from the second step on, the backward pass yields a NaN gradient
        if trainer.rl_step < 1:
            return clean(*a, **kw)
        with nan_gradient(trainer.learner):
            return clean(*a, **kw)

    trainer.learner.train_step = poisoned
    error = None
    try:
        trainer.run()
    except NonFiniteError as exc:
        error = str(exc)
    trainer.writer.flush()
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.learner.model[0].parameters())
    trainer.close()
    return {"error": error, "rl_step": trainer.rl_step, "finite": finite, "skipped": trainer.skipped_updates}


def test_nan_gradients_are_skipped_counted_and_stop_the_run(tmp_path) -> None:
    out = tmp_path / "run"
    (r,) = run_multiprocess(_nan_run, 1, str(out), timeout=600)
    assert r["error"] is not None and "train.max_nonfinite_skips=1" in r["error"], r
    assert r["skipped"] == 2 and r["rl_step"] == 2 and r["finite"], r  # step 3's update was the 2nd skip in a row
    scalars = read_scalars(out / "tb")
    assert [v for _, v in scalars["optim/skipped_updates"]] == [0.0, 1.0]
    assert [v for _, v in scalars["optim/update_skipped"]] == [0.0, 1.0]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2"


def _nan_learner(_: int) -> dict:
    import torch

    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner
    from tests.learner.test_train_step import run_config, step_batch

    cfg = run_config()
    init_distributed(cfg.parallel, seed=7)
    learner = Learner(cfg)
    learner.train_step(step_batch(0))
    params = lambda: [p.detach().clone() for p in learner.model[0].parameters()]  # noqa: E731
    before = params()
    with nan_gradient(learner):
        skipped = learner.train_step(step_batch(1))
    after_bad = params()
    good = learner.train_step(step_batch(2))
    after_good = params()
    return {
        "skipped_ok": skipped.update_successful,
        "skipped_norm_nan": math.isnan(skipped.grad_norm),
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after_bad)),
        "good_ok": good.update_successful,
        "moved": max(float((a - b).abs().max()) for a, b in zip(after_bad, after_good)),
        "finite": all(bool(torch.isfinite(p).all()) for p in after_good),
    }


def test_an_injected_nan_gradient_leaves_the_parameters_untouched() -> None:
    (r,) = run_multiprocess(_nan_learner, 1, 0, timeout=300)
    assert r["skipped_ok"] is False and r["skipped_norm_nan"] and r["unchanged"], r
    assert r["good_ok"] and r["moved"] > 0 and r["finite"], r


def test_rollout_batch_not_divisible_by_dp_fails_up_front() -> None:
    cfg = load_config(TINY, [*QUICK, "train.rollout_batch_size=5", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"train\.rollout_batch_size=5 is not divisible by the data-parallel size 2"):
        cfg.validate(world_size=2)


def _stop_during_warm_start(out: str, stop_file: str, stop_after: int) -> dict:
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.train.trainer import RLTrainer

    cfg = load_config(TINY, [*QUICK, "train.warm_start_steps=6", "train.steps=1", "checkpoint.save_interval=1",
                             f"logging.output_dir={out}"])
    init_distributed(cfg.parallel, seed=0)
    trainer = RLTrainer(cfg)
    resumed_warm_step = trainer.warm_step
    sft = trainer.learner.sft_step
    calls = []

    def sft_then_signal(*a, **kw):  # the job's USR1 trap writes the stop file during the warm start
        r = sft(*a, **kw)
        calls.append(1)
        if len(calls) == stop_after:
            Path(stop_file).write_text("USR1")
        return r

    trainer.learner.sft_step = sft_then_signal
    trainer.run()
    trainer.close()
    return {"resumed_warm_step": resumed_warm_step, "warm_step": trainer.warm_step, "rl_step": trainer.rl_step}


def test_stop_file_is_honoured_during_the_warm_start(tmp_path) -> None:
    out, stop = tmp_path / "run", tmp_path / "stop"
    env = {"MINPRO_STOP_FILE": str(stop)}
    (r,) = run_multiprocess(_stop_during_warm_start, 1, str(out), str(stop), 3, env=env, timeout=600)
    assert r == {"resumed_warm_step": 0, "warm_step": 3, "rl_step": 0}, r
    stop.unlink()
    (r,) = run_multiprocess(_stop_during_warm_start, 1, str(out), str(stop), 99, env=env, timeout=600)
    assert r == {"resumed_warm_step": 3, "warm_step": 6, "rl_step": 1}, r  # the warm start went on from step 3


def _overlong(out: str, data: str) -> dict:
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.train.trainer import RLTrainer

    cfg = load_config(TINY, [*QUICK, "data.task=jsonl", f"data.train_path={data}", f"logging.output_dir={out}"])
    init_distributed(cfg.parallel, seed=0)
    trainer = RLTrainer(cfg)
    prompts = sorted(p.prompt for p in trainer.stream.problems)
    trainer.close()
    return {"prompts": prompts, "dropped": trainer.dropped_rows}


def test_over_long_rows_are_dropped_and_counted_at_load(tmp_path, capfd) -> None:
    data = tmp_path / "train.jsonl"
    long = "+".join(["12"] * 40) + "="  # 120 characters; the context holds 64 - rollout.max_new_tokens 4 = 60
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 17)]
    rows.insert(3, {"prompt": long, "answer": "480"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (r,) = run_multiprocess(_overlong, 1, str(tmp_path / "run"), str(data), timeout=300)
    assert r["dropped"] == 1 and long not in r["prompts"] and len(r["prompts"]) == 7
    assert f"{data} line 4: prompt of" in capfd.readouterr().out


def _warm_start_position(out: str, updates_per_batch: int) -> dict:
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.train.trainer import RLTrainer

    cfg = load_config(TINY, [*QUICK, "train.warm_start_steps=2", f"train.updates_per_batch={updates_per_batch}",
                             f"logging.output_dir={out}"])
    init_distributed(cfg.parallel, seed=0)
    trainer = RLTrainer(cfg)
    before = trainer.stream.state_dict()["position"]
    trainer.warm_start()
    after = trainer.stream.state_dict()["position"]
    trainer.close()
    return {"drawn": after - before}


def test_warm_start_does_not_depend_on_updates_per_batch(tmp_path) -> None:
    """The supervised start draws one RL step's samples per step (8 prompts x group 4 = 32), also with
    several updates per RL batch: the drift axis of a sweep (updates_per_batch 1 vs 4) must start from the
    same policy. Before, it drew 32 / updates_per_batch and the updates_per_batch=4 runs started untrained."""
    (one,) = run_multiprocess(_warm_start_position, 1, str(tmp_path / "a"), 1, timeout=300)
    (four,) = run_multiprocess(_warm_start_position, 1, str(tmp_path / "b"), 4, timeout=300)
    assert one == four == {"drawn": 2 * 8 * 4}, (one, four)

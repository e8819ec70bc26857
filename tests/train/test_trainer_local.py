"""The RL trainer end to end with the local engine: an EP2 x DP2 learner under gloo writes every metric to
real TensorBoard event files; kill -9 mid-run + resume trains the next step on the same batch with the
same loss as an uninterrupted run; bad configs fail with one clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny_moe_cpu.yaml"

# A few quick steps of the embedded default's model (small batch, short warm start), with the local engine
# and MinPRO (the embedded default itself runs GRPO on an SGLang server: tests/train/test_trainer_sglang.py).
QUICK = [
    "rollout.backend=local",
    "loss.name=minpro",
    "train.rollout_batch_size=8",
    "train.group_size=4",
    "train.micro_batch_size=8",
    "train.warm_start_steps=2",
    "train.warm_start_until_accuracy=0",  # exactly 2 steps (the embedded default stops at a criterion)
    "train.steps=3",
    "data.num_eval=16",
    "train.eval_interval=3",
]


def run_trainer(argv: list[str]) -> int:
    from minpro_megatron.train.trainer import main

    return main(argv)


@pytest.mark.multiproc
def test_ep2_dp2_local_backend_writes_every_metric(tmp_path) -> None:
    out = tmp_path / "run"
    argv = [str(TINY), *QUICK, "parallel.expert=2", f"logging.output_dir={out}", "rollout.staleness.n=1",
            "checkpoint.save_interval=3"]
    assert run_multiprocess(run_trainer, 2, argv, timeout=900) == [0, 0]
    scalars = read_scalars(out / "tb")
    for tag in [
        "rollout/reward_mean", "rollout/reward_std", "rollout/accuracy", "rollout/response_length",
        "rollout/staleness_mean", "loss/entropy", "loss/clip_frac_high", "loss/clip_frac_low", "loss/ratio_mean",
        "loss/ratio_min", "loss/ratio_max", "loss/prefix_mean", "loss/prefix_p10", "loss/rho_min_mean",
        "loss/prefix_lowered_frac", "loss/kl_k1", "loss/kl_k3", "loss/nonfinite_count", "optim/grad_norm",
        "optim/lr", "sync/bytes", "time/rollout_s", "time/train_s", "time/sync_s", "time/step_s",
        "throughput/train_tokens_per_s", "throughput/rollout_tokens_per_s", "eval/accuracy", "warm_start/nll",
    ]:
        assert tag in scalars, f"{tag} missing from the event files"
    assert [s for s, _ in scalars["rollout/reward_mean"]] == [1, 2, 3]
    # exact delay n=1: step 1 trains on version 0 (age 0), steps 2 and 3 on versions 1 and 2 (age 1).
    assert [v for _, v in scalars["rollout/staleness_mean"]] == [0.0, 1.0, 1.0]
    # 8 prompts x 4 samples per step (counted over both DP ranks), all trained: every response has a token.
    assert [v for _, v in scalars["rollout/prompts"]] == [8.0] * 3 and [v for _, v in scalars["rollout/samples"]] == [32.0] * 3
    assert [v for _, v in scalars["rollout/request_retries"]] == [0.0] * 3  # the local engine sends no requests
    assert all(v > 0 for _, v in scalars["loss/num_tokens"])
    assert (out / "summary.md").is_file() and (out / "plot.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"


def _metrics_by_step(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites the steps after its checkpoint: keep the last
    return rows


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "minpro_megatron.cli", "train", str(TINY), *QUICK, *argv]


def test_kill_9_and_resume_trains_the_same_next_step(tmp_path) -> None:
    common = ["train.steps=4", "rollout.staleness.n=2", "checkpoint.save_interval=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "uninterrupted"
    first = subprocess.run(_cli([*common, f"logging.output_dir={ref}"]), env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli([*common, f"logging.output_dir={run}"]), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tracker = run / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 600
    while time.time() < deadline and not (tracker.is_file() and tracker.read_text().strip() == "2"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tracker.read_text().strip() in ("2", "3"), "the run should have been killed after its step-2 checkpoint"
    killed_at = int(tracker.read_text())

    resumed = subprocess.run(_cli([*common, f"logging.output_dir={run}"]), env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'} at RL step {killed_at}" in resumed.stdout
    want, got = _metrics_by_step(ref / "tb" / "metrics.jsonl"), _metrics_by_step(run / "tb" / "metrics.jsonl")
    for step in range(killed_at + 1, 5):
        assert got[step]["debug/batch_digest"] == want[step]["debug/batch_digest"], step
        assert got[step]["loss/loss"] == want[step]["loss/loss"], step
        assert got[step]["optim/grad_norm"] == want[step]["optim/grad_norm"], step


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["parallel.tensor=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor=3"),
        (["parallel.expert=3"], "model.num_experts=4 is not divisible by parallel.expert=3"),
        (["train.micro_batch_size=5"], "not divisible by data-parallel size 1 x train.micro_batch_size=5"),
        (["train.updates_per_batch=3"], "not divisible by train.updates_per_batch=3"),
        (["loss.name=ppo"], "loss.name='ppo' is not allowed"),
        (["optim.lr=fast"], "optim.lr must be a number"),
        (["train.stepz=3"], "unknown config key"),
    ],
)
def test_bad_configs_fail_with_one_clear_error(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg = load_config(TINY, overrides)
        cfg.validate(world_size=1)


def _hf_policy_check(hf_dir: str, out: str) -> float:
    """1 process: the trainer built from model.hf_path scores tokens exactly like transformers."""
    import torch

    from minpro_megatron.config import load_config
    from minpro_megatron.learner.batch import TrainSample
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.train.trainer import RLTrainer
    from minpro_megatron.weights.verify import hf_logprob_reference

    cfg = load_config(TINY, [*QUICK, f"model.hf_path={hf_dir}", f"logging.output_dir={out}"])
    init_distributed(cfg.parallel, seed=0)
    trainer = RLTrainer(cfg)
    tokens = [1, 5, 6, 14, 7, 8, 17, 9, 10]
    ours = trainer.learner.score([TrainSample(torch.tensor(tokens), 1, torch.zeros(len(tokens) - 1), 0.0)], temperature=1.0)[0]
    from transformers import AutoModelForCausalLM

    ref = hf_logprob_reference(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval())(tokens)
    trainer.close()
    return float((ours.double() - torch.tensor(ref, dtype=torch.float64)).abs().max())


def test_trainer_starts_from_a_hugging_face_checkpoint(tmp_path) -> None:
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir

    _, _, hf_dir = make_tiny_model_dir(tmp_path / "hf", kind="qwen3_moe", seed=3, initializer_range=0.125)
    (diff,) = run_multiprocess(_hf_policy_check, 1, str(hf_dir), str(tmp_path / "run"), timeout=600)
    assert diff < 1e-5


@pytest.mark.parametrize("n,overflow", [(1, "drop"), (0, "drop"), (0, "requeue")])
def test_bounded_age_staleness_admits_drops_and_requeues(tmp_path, n, overflow) -> None:
    out = tmp_path / "run"
    argv = [str(TINY), *QUICK, "train.eval_interval=0", "checkpoint.save_interval=0", f"logging.output_dir={out}",
            "rollout.staleness.mode=bounded", f"rollout.staleness.n={n}", f"rollout.staleness.overflow={overflow}"]
    assert run_multiprocess(run_trainer, 1, argv, timeout=600) == [0]
    scalars = read_scalars(out / "tb")
    ages = [v for _, v in scalars["rollout/staleness_mean"]]
    dropped = [v for _, v in scalars["rollout/stale_dropped"]]
    requeued = [v for _, v in scalars["rollout/stale_requeued"]]
    if n == 1:  # the run-ahead batch (generated during step s) trains at step s + 1: age 1, never stale
        assert ages == [0.0, 1.0, 1.0] and dropped == [0.0, 0.0, 0.0]
    else:  # n = 0: every run-ahead batch is one version too old when the next step comes
        assert ages == [0.0, 0.0, 0.0]
        counted = dropped if overflow == "drop" else requeued
        assert counted == [0.0, 8.0, 16.0]  # 8 groups per step, cumulative


def _recompute_run(out: Path, staleness: int) -> dict[str, list[float]]:
    argv = [str(TINY), *QUICK, f"logging.output_dir={out}", f"rollout.staleness.n={staleness}", "loss.old_logp=recompute",
            "loss.mismatch_correction=tis", "checkpoint.save_interval=0"]
    assert run_multiprocess(run_trainer, 1, argv, timeout=900) == [0]
    return {tag: [v for _, v in series] for tag, series in read_scalars(out / "tb").items()}


@pytest.mark.multiproc
def test_recompute_old_logp_logs_mismatch_and_is_zero_on_policy(tmp_path) -> None:
    """loss.old_logp=recompute with the local engine: the learner's recomputed log-probs are compared with
    the engine's every step. At staleness 0 the engine samples with the very model that recomputes, so
    the mismatch is ~0 (float32 noise between incremental and packed forwards), the TIS factor is 1 and
    nothing is truncated; at staleness 1 pi_old is one update newer than the behaviour policy, so the same
    metrics show the drift - the recomputed values really replace the server's."""
    on = _recompute_run(tmp_path / "s0", 0)
    for tag in ["mismatch/abs_delta_mean", "mismatch/abs_delta_max", "mismatch/kl_k3", "mismatch/ratio_p10",
                "mismatch/ratio_p90", "mismatch/num_tokens", "loss/mismatch_is_mean", "loss/mismatch_truncated_frac"]:
        assert len(on[tag]) == 3, tag
    assert on["mismatch/num_tokens"] == on["loss/num_tokens"]
    assert max(on["mismatch/abs_delta_max"]) < 1e-4
    assert all(abs(v - 1) < 1e-4 for v in on["mismatch/ratio_p10"] + on["mismatch/ratio_p90"] + on["loss/mismatch_is_mean"])
    assert on["loss/mismatch_truncated_frac"] == [0.0, 0.0, 0.0]
    assert all(abs(v - 1) < 1e-4 for v in on["loss/ratio_max"] + on["loss/ratio_min"])  # pi / pi_old on a single update

    stale = _recompute_run(tmp_path / "s1", 1)
    assert stale["mismatch/abs_delta_max"][0] < 1e-4  # step 1 trains on version 0, as at staleness 0
    assert min(stale["mismatch/abs_delta_mean"][1:]) > 100 * max(on["mismatch/abs_delta_mean"])

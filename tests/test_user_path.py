"""A user's path after training: the run's summary.md / plot.png, the sample dump and its viewer, minpro-eval
(grader choice, results next to the run, never overwritten, unknown characters), and the export of a run
started from scratch to Hugging Face, loaded by transformers. One short real run of the embedded default
(the Megatron learner on gloo, the local engine) feeds all of them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minpro_megatron import cli
from minpro_megatron.metrics.report import read_scalars
from tests.train.test_trainer_local import QUICK, REPO, TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user") / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "minpro_megatron.cli", "train", str(TINY), *QUICK, "checkpoint.save_interval=3",
                           "rollout.staleness.n=0", "logging.dump_samples=2", f"logging.output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the CPU path is announced in one line instead of megatron's TransformerEngine / apex warnings
    assert "CPU path:" in proc.stderr
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
    assert "Apex is not installed" not in proc.stderr
    # the run ends saying where its results are, with the accuracy it reached
    scalars = read_scalars(out / "tb")["eval/accuracy"]
    assert f"greedy held-out accuracy: {scalars[0][1]:.3f} (step 0) -> {scalars[-1][1]:.3f} (step 3)" in proc.stdout, proc.stdout[-2000:]
    for line in (f"summary:     {out / 'summary.md'}", f"plot:        {out / 'plot.png'}", f"TensorBoard: tensorboard --logdir {out / 'tb'}"):
        assert line in proc.stdout, proc.stdout[-2000:]
    return out


def test_summary_describes_the_run_and_internal_metrics_stay_out(run_dir) -> None:
    text = (run_dir / "summary.md").read_text()
    for line in ("- **method**: minpro", "- **staleness**: exact, n=0", "- **steps**: 3 of 3 RL steps (8 prompts x 4 samples each)",
                 "- **warm start**: 2 supervised steps at lr 0.001, nll ", "- **wall time**: ", "- **model**: 2 layers, hidden 128, 4 experts top-2, random init"):
        assert line in text, text
    assert "debug/" not in text and "| warm_start/nll |" in text
    assert "debug/batch_digest" not in read_scalars(run_dir / "tb")  # TensorBoard shows user metrics only
    rows = [json.loads(line) for line in (run_dir / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert any("debug/batch_digest" in r for r in rows)  # the resume check still has it
    assert (run_dir / "plot.png").stat().st_size > 10_000


def test_first_and_last_are_values_for_short_series_and_window_means_for_long_ones(tmp_path) -> None:
    from minpro_megatron.metrics.run_summary import write_run_summary
    from minpro_megatron.metrics.writer import MetricsWriter

    w = MetricsWriter(tmp_path / "tb")
    for step in range(7):  # sparse: like the demo's evaluations
        w.scalars(step * 25, {"eval/accuracy": 0.5 + 0.01 * step, "debug/batch_digest": 123.0})
    for step in range(1, 31):
        w.scalars(step, {"rollout/reward_mean": float(step)})
    for step in range(3):
        w.scalars(step, {"warm_start/nll": 3.0 - step})
    w.close()
    write_run_summary(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ") and "metric" not in line}
    assert rows["eval/accuracy"][:2] == ["0.5", "0.56"]  # first and last value (7 points < 20)
    assert rows["rollout/reward_mean"][:2] == ["5.5", "25.5"]  # means of the first / last 10 points
    assert rows["warm_start/nll"][:2] == ["3", "1"]
    assert "debug/batch_digest" not in rows and "debug/batch_digest" not in read_scalars(tmp_path / "tb")


def test_sample_dump_schema_and_viewer(run_dir, capsys) -> None:
    from minpro_megatron.metrics.samples import exclusive_prefix_min

    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    for r in rows:
        assert set(r) >= {"prompt", "response", "answer", "reward", "advantage", "ratio", "prefix_min", "tokens",
                          "behaviour_logp", "logp", "versions", "data_source"}
        n = len(r["tokens"])
        assert n >= 1 and len(r["ratio"]) == len(r["prefix_min"]) == len(r["logp"]) == len(r["behaviour_logp"]) == n
        ratios = [math.exp(a - b) for a, b in zip(r["logp"], r["behaviour_logp"])]
        assert r["ratio"] == pytest.approx(ratios, rel=1e-4)
        assert r["prefix_min"] == pytest.approx(exclusive_prefix_min(ratios), rel=1e-4)
        assert r["reward"] in (0.0, 1.0) and r["data_source"] == "arithmetic"
    # on-policy (n=0) with one update per batch: the behaviour policy is the scoring policy
    assert all(abs(x - 1.0) < 1e-3 for r in rows for x in r["ratio"])
    assert exclusive_prefix_min([0.9, 1.2, 0.5, 2.0]) == [1.0, 0.9, 0.9, 0.5]
    assert cli.samples_main([str(run_dir), "--last", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 3 #0  reward ") and "prefix-min" in out and "step 2" not in out
    assert cli.samples_main([str(run_dir), "--step", "9"]) == 2
    assert "no samples of step 9" in capsys.readouterr().err


def test_eval_says_which_grader_writes_next_to_the_run_and_never_overwrites(run_dir, tmp_path, capsys) -> None:
    bench = tmp_path / "bench.jsonl"  # no data_source: inferred from the run's data.task, and said so
    bench.write_text('{"prompt": "12+34=", "answer": "46"}\n{"prompt": "01+01=", "answer": "2"}\n')
    argv = ["--checkpoint", str(run_dir), "--data", str(bench), "--n", "2", "--k", "1,2"]
    assert cli.eval_main(argv) == 0  # CONFIG defaults to the run's config.yaml
    out = capsys.readouterr().out
    assert "2 problems graded by exact-match (data_source=arithmetic) (from data.task=arithmetic of the run config" in out
    assert cli.eval_main([str(TINY), *argv]) == 0
    capsys.readouterr()
    results = sorted((run_dir / "eval").glob("bench-iter3-*.json"))
    assert len(results) == 2  # a second evaluation gets its own file
    res = json.loads(results[0].read_text())
    assert res["iteration"] == 3 and res["data"] == str(bench.resolve()) and res["n"] == 2
    assert res["sampling"]["temperature"] == 1.0 and res["sampling"]["max_new_tokens"] == 4
    assert res["graders"] == ["exact-match (data_source=arithmetic)"] and 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0

    # explicit data_source: math-verify, said so; characters the tokenizer lacks are warned about
    math_bench = tmp_path / "math.jsonl"
    math_bench.write_text('{"prompt": "Q: 12+34=", "answer": "46", "data_source": "math"}\n')
    assert cli.eval_main(["--checkpoint", str(run_dir / "checkpoints" / "iter_0000003"), "--data", str(math_bench), "--n", "1"]) == 0
    captured = capsys.readouterr()
    assert "graded by math-verify (data_source=math) (from the rows' data_source)" in captured.out
    assert "warning:" in captured.err and "(':', 'Q'); they become '<unk>'" in captured.err
    assert cli.eval_main(["--checkpoint", str(run_dir), "--data", str(math_bench), "--n", "1", "--data-source", "arithmetic"]) == 0
    assert "exact-match (data_source=arithmetic) (from --data-source arithmetic)" in capsys.readouterr().out


def test_checkpoint_of_a_run_from_scratch_exports_to_hf_and_transformers_loads_it(run_dir, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minpro_megatron.convert.megatron_checkpoint import checkpoint_extra

    extra = checkpoint_extra(run_dir / "checkpoints")
    assert extra["model_config"]["hidden_size"] == 128 and extra["tokenizer"] == "builtin:char" and extra["rl_step"] == 3

    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(run_dir / "checkpoints"),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model description" not in proc.stderr  # read from the checkpoint itself, not from config.yaml
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.hidden_size == 128
    assert model.config.num_experts == 4 and model.config.vocab_size == len(tok) == 32
    ids = [tok.bos_token_id] + tok.encode("12+34=", add_special_tokens=False)
    assert tok.decode(ids[1:]) == "12+34="
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 32) and torch.isfinite(logits).all()


def test_wandb_is_not_imported_when_off_and_gets_every_user_metric_when_on(tmp_path, monkeypatch) -> None:
    import types

    from minpro_megatron.metrics.writer import MetricsWriter

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    w = MetricsWriter(tmp_path / "off")
    w.scalars(1, {"rollout/reward_mean": 0.5})
    w.close()
    assert "wandb" not in sys.modules
    calls: list = []

    class FakeRun:  # a stand-in for wandb's Run (the wandb package is not installed here)
        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = MetricsWriter(tmp_path / "on", wandb={"project": "p", "name": "run"})
    w.scalars(2, {"rollout/reward_mean": 0.25, "debug/batch_digest": 7.0})
    w.close()
    assert calls[0] == ("init", {"project": "p", "name": "run", "resume": "allow"})
    assert calls[1] == ("log", {"trainer/step": 2, "rollout/reward_mean": 0.25}) and calls[2] == ("finish",)

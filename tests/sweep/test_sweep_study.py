"""The staleness study's sweep (docs/staleness_study.md): the committed grid file (order, names, every cell
validates), the collector's study numbers from metrics.jsonl alone, and the 2-cell CI smoke of the study
command: a sweep killed in its second cell resumes without redoing the first, and a base config with
checkpoint.dir set gives every cell its own checkpoint directory."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.sweep import DONE_MARKER, collect, load_grid, run_stats, select_cells, validate_cells

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "examples" / "study" / "reverse_moe.yaml"
GRID = REPO / "examples" / "study" / "grid.yaml"


def test_study_grid_is_fixed_ordered_and_valid() -> None:
    cells = load_grid(GRID)
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 36 + 12 + 9 + 18
    # the core cells of seed 1 run first, then the rest of seed 1, then seed 2 ...
    assert names[:12] == [f"core-{m}-n{n}-s1" for m in ("grpo", "cispo", "minpro") for n in (0, 2, 4, 8)]
    assert all(n.endswith("-s1") for n in names[:12 + 4 + 3 + 6]) and names[25].endswith("-s2")
    by = {c.name: c for c in cells}
    assert {"loss.dual_clip=3.0", "loss.log_ratio_clamp=20.0"} <= set(by["core-grpo-n4-s2"].overrides)
    assert "loss.aggregation=seq-mean-token-mean" in by["base2-gspo-n4-s3"].overrides
    assert "train.updates_per_batch=4" in by["upb4-minpro-n4-s1"].overrides
    assert {c.name for c in cells if c.group == "prefix"} == {
        f"prefix-minpro-{s}-n8-s{seed}" for s in ("prod", "mean", "none") for seed in (1, 2, 3)}
    validate_cells(str(STUDY), [], cells)
    cfg = load_config(STUDY, list(by["core-minpro-n8-s3"].overrides))
    assert (cfg.loss.name, cfg.rollout.staleness.n, cfg.train.seed, cfg.rollout.max_new_tokens) == ("minpro", 8, 3, 33)
    assert [c.name for c in select_cells(cells, "core-*-n0-s1,prefix-minpro-prod-n8-s2")] == [
        "core-grpo-n0-s1", "core-cispo-n0-s1", "core-minpro-n0-s1", "prefix-minpro-prod-n8-s2"]
    with pytest.raises(ConfigError, match="--only: 'core-ppo-\\*' matches no cell"):
        select_cells(cells, "core-ppo-*")


@pytest.mark.parametrize(
    "text,match",
    [
        ("seeds: [1]\nmethods: {a: [loss.name=grpo]}\ngroups: [{name: g, methods: [b], staleness: [0]}]", "method 'b'"),
        ("seeds: []\nmethods: {a: [loss.name=grpo]}\ngroups: [{name: g, methods: [a], staleness: [0]}]", "'seeds'"),
        ("seeds: [1]\nmethods: {a: [grpo]}\ngroups: [{name: g, methods: [a], staleness: [0]}]", "methods.a"),
        ("seeds: [1]\nmethods: {a: [loss.name=grpo]}\ngroups: [{name: g, methods: [a], staleness: [-1]}]", "staleness"),
        ("seeds: [1]\nmethods: {a: [loss.name=grpo]}\ngroups: [{name: g, methods: [a], staleness: [0], lr: 1}]", "lr"),
        ("seeds: [1]\nmethod: {}\n", "unknown key"),
    ],
)
def test_bad_grid_files_name_the_field(tmp_path, text, match) -> None:
    f = tmp_path / "grid.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_grid(f)
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("seeds: [1]\nmethods: {a: [loss.name=ppo]}\ngroups: [{name: g, methods: [a], staleness: [0]}]")
    with pytest.raises(ConfigError, match="sweep cell g-a-n0-s1"):
        validate_cells(str(STUDY), [], load_grid(bad_value))


def _write_run(root: Path, name: str, group: str, method: str, n: int, seed: int, evals: list[tuple[int, float]],
               rewards: list[float], kl: float, done: bool = True) -> None:
    d = root / name
    (d / "tb").mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({"loss": {"name": method}, "rollout": {"staleness": {"n": n}}, "train": {"seed": seed}}))
    (d / "cell.json").write_text(json.dumps({"name": name, "group": group, "method": method}))
    if done:
        (d / DONE_MARKER).write_text(json.dumps({"exit_code": 0, "wall_s": 200.5, "loadavg_start": [3.5, 2.0, 1.0]}))
    rows = [{"step": s, "warm_start/nll": 1.0} for s in (0, 10)]  # the warm start shares the step axis
    for s, v in evals:
        rows.append({"step": s, "eval/accuracy": v})
    for i, r in enumerate(rewards, start=1):
        rows.append({"step": i, "rollout/reward_mean": r, "loss/kl_k3": kl * i, "loss/clip_frac_high": 0.1, "loss/clip_frac_low": 0.0,
                     "loss/rho_min_mean": 0.9, "loss/rho_min_p10": 0.8, "loss/rho_min_min": 0.1 * i, "loss/entropy": 1.0,
                     "optim/grad_norm": 1.0})
    (d / "tb" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_stats_definitions() -> None:
    s = run_stats({"eval/accuracy": [(0, 0.6), (10, 0.8), (20, 0.7)], "rollout/reward_mean": [(1, 0.2), (2, 0.4)],
                   "loss/kl_k3": [(1, 0.01), (2, 0.03)], "loss/rho_min_min": [(1, 0.5), (2, 0.25)]})
    assert (s["acc_start"], s["acc_final"], s["acc_best"], s["collapsed"]) == (0.6, 0.7, 0.8, 0.0)
    assert s["reward_auc"] == pytest.approx(0.3) and s["kl_k3"] == pytest.approx(0.02) and s["rho_min_min"] == 0.25
    assert run_stats({"eval/accuracy": [(0, 0.6), (20, 0.29)]})["collapsed"] == 1.0  # below half the start
    assert run_stats({"eval/accuracy": [(0, 0.6), (20, 0.6)], "rollout/reward_mean": [(1, math.nan)]})["collapsed"] == 1.0


def test_collect_study_table_from_metrics_jsonl_only(tmp_path) -> None:
    """The committed study files (no TensorBoard events) are enough for the table and plots; seeds are
    grouped per (group, method, n), unfinished cells are left out and listed as pending."""
    runs = tmp_path / "runs"
    _write_run(runs, "core-minpro-n4-s1", "core", "minpro", 4, 1, [(0, 0.5), (10, 0.7), (20, 0.6)], [0.2, 0.4], 0.01)
    _write_run(runs, "core-minpro-n4-s2", "core", "minpro", 4, 2, [(0, 0.5), (10, 0.5), (20, 0.8)], [0.4, 0.6], 0.03)
    _write_run(runs, "upb4-minpro-n4-s1", "upb4", "minpro", 4, 1, [(0, 0.5), (20, 0.2)], [0.1] * 7, 0.2)
    _write_run(runs, "core-grpo-n4-s1", "core", "grpo", 4, 1, [(0, 0.5), (10, 0.9)], [0.9], 0.0, done=False)
    cells = [c for c in load_grid(GRID) if c.name in {"core-minpro-n4-s1", "core-minpro-n4-s2", "upb4-minpro-n4-s1", "core-grpo-n4-s1"}]
    table, plots = collect(runs, tmp_path, cells)
    rows = {(r["group"], r["method"]): r for r in csv.DictReader(open(tmp_path / "sweep_table.csv"))}
    assert set(rows) == {("core", "minpro"), ("upb4", "minpro")}  # the running grpo cell is not a result yet
    core = rows[("core", "minpro")]
    assert core["seeds"] == "2" and float(core["acc_final"]) == pytest.approx(0.7)
    assert float(core["acc_final_std"]) == pytest.approx(math.sqrt(0.02))
    assert float(core["acc_best"]) == pytest.approx(0.75) and float(core["reward_auc"]) == pytest.approx(0.4)
    assert float(core["kl_k3"]) == pytest.approx(0.03) and float(core["rho_min_min"]) == pytest.approx(0.1)  # kl 1.5 x
    upb4 = rows[("upb4", "minpro")]
    assert float(upb4["collapsed"]) == 1.0
    # the study's KL is the mean over all RL steps (0.2 x mean(1..7)); the legacy column the last 5 points
    assert float(upb4["kl_k3"]) == pytest.approx(0.8) and float(upb4["kl_k3_last5"]) == pytest.approx(1.0)
    text = table.read_text()
    assert "| method | staleness | group | seeds |" in text and "| minpro | 4 | core | 1,2 | 0.5 ± 0 | 0.7 ± 0.14 |" in text
    assert "3 of 4 cells finished; 1 pending" in text  # done-marker-less cells count as pending
    assert (tmp_path / "sweep_pending.txt").read_text().split() == ["core-grpo-n4-s1"]
    per_run = list(csv.DictReader(open(tmp_path / "sweep_runs.csv")))
    assert [r["name"] for r in per_run] == ["core-minpro-n4-s1", "core-minpro-n4-s2", "upb4-minpro-n4-s1"]
    assert float(per_run[0]["wall_s"]) == 200.5 and float(per_run[0]["load_1min_at_start"]) == 3.5
    for p in plots:
        assert p.stat().st_size > 5000


# The study command with tiny steps (the CI smoke): 2 cells of the committed grid.
SMOKE = ["train.steps=2", "train.warm_start_steps=2", "train.rollout_batch_size=4", "train.group_size=4",
         "train.micro_batch_size=16", "data.num_eval=8", "train.eval_interval=1", "checkpoint.save_interval=1",
         "train.warm_start_check_samples=8"]  # the study's warm start to a criterion, capped at 2 steps here
SMOKE_CELLS = "core-grpo-n0-s1,core-minpro-n2-s1"


@pytest.mark.slow
def test_study_smoke_killed_sweep_resumes_and_cells_own_checkpoints(tmp_path) -> None:
    out, shared = tmp_path / "study", tmp_path / "shared_ckpt"
    cmd = [sys.executable, "-m", "minpro_megatron.cli", "sweep", "run", str(STUDY), *SMOKE, f"checkpoint.dir={shared}",
           "--grid", str(GRID), "--only", SMOKE_CELLS, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first, second = out / "runs" / "core-grpo-n0-s1", out / "runs" / "core-minpro-n2-s1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900  # a guard against a hang, not a timing assertion
        while not (second / "tb" / "metrics.jsonl").is_file():  # the second cell's trainer has started
            assert proc.poll() is None, f"the sweep exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "the sweep never reached its second cell"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its trainer, mid-cell
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (first / DONE_MARKER).is_file() and not (second / DONE_MARKER).is_file()
    marker = (first / DONE_MARKER).read_text()
    metrics = (first / "tb" / "metrics.jsonl").read_bytes()
    (second / "leftover_of_the_killed_attempt").write_text("x")

    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    # the finished cell was not redone; the killed one restarted from scratch and finished
    assert (first / DONE_MARKER).read_text() == marker and (first / "tb" / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((second / DONE_MARKER).read_text())["exit_code"] == 0
    assert not (second / "leftover_of_the_killed_attempt").exists()
    steps = [json.loads(line)["step"] for line in (second / "tb" / "metrics.jsonl").read_text().splitlines()
             if "rollout/reward_mean" in line]
    assert steps == [1, 2]  # one uninterrupted attempt: no duplicated steps
    # a base config with checkpoint.dir: every cell has its own directory under it, none is shared
    assert not (shared / "latest_checkpointed_iteration.txt").exists()
    for cell in ("core-grpo-n0-s1", "core-minpro-n2-s1"):
        assert (shared / cell / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # table and plots written, values finite
    rows = list(csv.DictReader(open(out / "sweep_table.csv")))
    assert {(r["method"], r["staleness"]) for r in rows} == {("grpo", "0"), ("minpro", "2")}
    for r in rows:
        for col in ("acc_start", "acc_final", "acc_best", "reward_auc", "kl_k3", "clip_high", "rho_min_mean"):
            assert math.isfinite(float(r[col])), (r["method"], col, r[col])
    assert "2 of 2 cells finished; 0 pending" in (out / "sweep_table.md").read_text()
    # 2 warm-start steps cannot reach the study's criterion: both cells are flagged as capped
    assert "in 2 run(s): core-grpo-n0-s1, core-minpro-n2-s1." in (out / "sweep_table.md").read_text()
    for png in ("sweep_eval_accuracy.png", "sweep_rollout_reward_mean.png", "sweep_accuracy_vs_staleness.png"):
        assert (out / png).stat().st_size > 5000


def test_collect_writes_the_results_block_of_the_doc(tmp_path) -> None:
    from minpro_megatron.sweep import RESULTS_BEGIN, RESULTS_END, main

    runs = tmp_path / "study" / "runs"
    _write_run(runs, "core-cispo-n2-s1", "core", "cispo", 2, 1, [(0, 0.4), (10, 0.6)], [0.3], 0.02)
    doc = tmp_path / "study.md"
    doc.write_text(f"# Study\n\n## Results\n{RESULTS_BEGIN}\nold table\n{RESULTS_END}\n\n## After\n")
    assert main(["collect", str(runs), "--grid", str(GRID), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Study\n") and text.endswith("\n## After\n")
    assert "| cispo | 2 | core | 1 | 0.4 | 0.6 |" in text and "1 of 75 cells finished; 74 pending" in text
    assert "![sweep_accuracy_vs_staleness](study/sweep_accuracy_vs_staleness.png)" in text
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="no results block"):
        main(["collect", str(runs), "--doc", str(doc)])


def test_completion_is_the_marker_and_older_sweeps_finished_runs_count(tmp_path) -> None:
    from minpro_megatron.sweep import is_done

    d = tmp_path / "cell"
    d.mkdir()
    (d / "summary.md").write_text("t")
    assert is_done(d)  # an older sweep's finished run (no cell.json): never deleted and redone
    (d / "cell.json").write_text("{}")
    assert not is_done(d)  # this sweep's cell: killed after the summary, before the marker
    (d / DONE_MARKER).write_text("{}")
    assert is_done(d)

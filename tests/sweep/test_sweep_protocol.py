"""The staleness study's protocol amendment (docs/staleness_study.md, "Amendment (protocol v2)") in the
sweep: the study config holds the v2 warm-start rule; the protocol-v1 cells (docs/staleness_study/runs_v1)
still collect; a sweep never counts a finished cell of another protocol as its own and the collector never
averages two protocols into one row; cells whose warm start hit its cap are flagged; an empty sweep
folder collects to "0 finished, all pending"."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from minpro_megatron.config import load_config
from minpro_megatron.config.base import UserError
from minpro_megatron.sweep import collect, load_grid, run_local
from minpro_megatron.sweep.protocol import protocol_differences
from tests.sweep.test_sweep_study import GRID, STUDY, _write_run

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "docs" / "staleness_study" / "runs_v1"


def test_the_study_config_holds_the_v2_warm_start_rule() -> None:
    t = load_config(STUDY).train
    assert (t.warm_start_until_accuracy, t.warm_start_steps, t.warm_start_check_interval, t.warm_start_check_samples) == (
        0.1, 600, 25, 64)
    v1 = yaml.safe_load((V1 / "core-grpo-n0-s2" / "config.yaml").read_text())
    now = _as_dict(STUDY, ["loss.name=grpo", "loss.dual_clip=3.0", "loss.log_ratio_clamp=20.0", "train.seed=2"])
    diff = {k for k, _, _ in protocol_differences(v1, now)}
    # v1 predates the field: it counts with its default (0, off), so the amendment is a difference
    assert diff == {"train.warm_start_steps", "train.warm_start_until_accuracy"}, diff


def _as_dict(config: Path, overrides: list[str]) -> dict:
    from minpro_megatron.config import to_dict

    return to_dict(load_config(config, overrides))


def test_the_v1_cells_still_collect(tmp_path) -> None:
    table, plots = collect(V1, tmp_path)
    runs = list(csv.DictReader(open(tmp_path / "sweep_runs.csv")))
    assert len(runs) == 29 and len(plots) == 7
    seed2 = [r for r in runs if r["name"].endswith("-s2")]
    assert len(seed2) == 4 and all(float(r["acc_final"]) == 0.0 and float(r["reward_auc"]) == 0.0 for r in seed2)
    assert {float(r["warm_steps"]) for r in runs} == {150.0}  # the fixed rule: no cap to hit
    assert "Warm start hit its cap" not in table.read_text()


def _v2_copy(src: Path, dst: Path, seed: int) -> None:
    """A v1 cell's files as if made under v2 (the amended warm start), under another name."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["train"].update(seed=seed, warm_start_steps=600, warm_start_until_accuracy=0.1, warm_start_check_interval=25,
                        warm_start_check_samples=64)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    cell = json.loads((dst / "cell.json").read_text())
    cell["overrides"] = [o.replace("train.seed=1", f"train.seed={seed}") for o in cell["overrides"]]
    (dst / "cell.json").write_text(json.dumps(cell))


def test_collect_refuses_to_mix_protocols(tmp_path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(V1 / "core-grpo-n0-s1", runs / "core-grpo-n0-s1")
    shutil.copytree(V1 / "core-minpro-n8-s1", runs / "core-minpro-n8-s1")  # another method and n: one protocol
    collect(runs, tmp_path / "ok")
    _v2_copy(V1 / "core-grpo-n0-s2", runs / "core-grpo-n0-s3", seed=3)
    with pytest.raises(UserError, match=r"the runs mix protocols: core-grpo-n0-s1 and core-grpo-n0-s3 differ in "
                                        r"train\.warm_start_steps: .*150.*600.*train\.warm_start_until_accuracy"):
        collect(runs, tmp_path / "mixed")


def test_a_sweep_refuses_a_finished_cell_of_another_protocol(tmp_path) -> None:
    out = tmp_path / "study"
    shutil.copytree(V1 / "core-grpo-n0-s1", out / "runs" / "core-grpo-n0-s1")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    cells = [c for c in load_grid(GRID) if c.name == "core-grpo-n0-s1"]  # without the check: skipped as finished
    with pytest.raises(UserError, match=r"1 finished cell\(s\) under .* were run with another config .*core-grpo-n0-s1 "
                                        r"\(train\.warm_start_steps: finished with 150, now 600; train\.warm_start_until_"
                                        r"accuracy: finished with 0\.0, now 0\.1\).*runs_v1"):
        run_local(str(STUDY), [], cells, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing ran, nothing was deleted


def test_collect_flags_cells_whose_warm_start_hit_its_cap(tmp_path) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "core-grpo-n0-s1", "core", "grpo", 0, 1, [(0, 0.5), (10, 0.6)], [0.3], 0.0)
    _write_run(runs, "core-grpo-n0-s2", "core", "grpo", 0, 2, [(0, 0.0), (10, 0.0)], [0.0], 0.0)
    for name, steps, hit in (("core-grpo-n0-s1", 275.0, 0.0), ("core-grpo-n0-s2", 600.0, 1.0)):
        with open(runs / name / "tb" / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "warm_start/steps_taken": steps, "warm_start/cap_hit": hit}) + "\n")
    table, _ = collect(runs, tmp_path)
    text = table.read_text()
    assert "**Warm start hit its cap without meeting its criterion** in 1 run(s): core-grpo-n0-s2." in text
    assert "| 438 ± 2.3e+02 |" in text  # warm_steps: mean ± std over the two seeds
    per_run = {r["name"]: r for r in csv.DictReader(open(tmp_path / "sweep_runs.csv"))}
    assert float(per_run["core-grpo-n0-s2"]["warm_cap_hit"]) == 1.0 and float(per_run["core-grpo-n0-s1"]["warm_cap_hit"]) == 0.0
    assert float(per_run["core-grpo-n0-s1"]["warm_steps"]) == 275.0


def test_an_empty_sweep_folder_collects_to_all_pending(tmp_path) -> None:
    from minpro_megatron.sweep import RESULTS_BEGIN, RESULTS_END, main

    runs = tmp_path / "study" / "runs"
    runs.mkdir(parents=True)
    doc = tmp_path / "study.md"
    doc.write_text(f"# Study\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\n")
    assert main(["collect", str(runs), "--grid", str(GRID), "--doc", str(doc)]) == 0
    assert "0 of 75 cells finished; 75 pending." in doc.read_text() and "old" not in doc.read_text()
    assert len((tmp_path / "study" / "sweep_pending.txt").read_text().split()) == 75
    with pytest.raises(UserError, match="no finished runs"):  # without the grid there is nothing to say
        collect(runs, tmp_path / "x")

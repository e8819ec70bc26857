"""docs/data.md: its preprocessing commands run on the shipped sample files (the exact commands of the doc),
the rows they write load and grade as documented, and its reward-registration example works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from minpro_megatron.data.dataset import load_problems

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "data.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_preprocessing_example_runs_on_the_shipped_files(tmp_path) -> None:
    from minpro_megatron.rewards import grader_name, reward

    (commands,) = [b for b in _blocks("bash") if "prep_math_data.py" in b]
    env = {**os.environ, "WORK": str(tmp_path), "PYTHONPATH": str(REPO)}
    for line in commands.strip().splitlines():
        assert line.startswith("python ")
        proc = subprocess.run(["bash", "-c", line.replace("python ", f"{sys.executable} ", 1)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    gsm = load_problems(tmp_path / "gsm8k.jsonl")
    assert [p.answer for p in gsm] == ["12", "110", "58", "400"]
    assert all(p.data_source == "math" and "\\boxed{}" in p.prompt for p in gsm)
    math = load_problems(tmp_path / "math.jsonl")
    assert [p.answer for p in math] == ["23", "\\frac{3}{4}", "5"]
    assert math[0].prompt.startswith('[{"role": "user"')  # --chat: a message list
    assert grader_name("math") == "math-verify"
    assert reward("math", "so x = \\boxed{5}", math[2].answer) == 1.0
    assert reward("math", "\\boxed{0.75}", math[1].answer) == 1.0
    assert reward("math", "\\boxed{6}", math[2].answer) == 0.0


def test_reward_registration_example(tmp_path, monkeypatch) -> None:
    from minpro_megatron.config import load_config
    from minpro_megatron.preflight import check_run_inputs
    from minpro_megatron.rewards import grader_name, reward

    (module,) = [b for b in _blocks("python") if "register_reward" in b]
    (tmp_path / "my_rewards.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward("yes_no", "Yes, it is", "yes") == 0.0  # unregistered: math-verify, which rejects it
    cfg = load_config(REPO / "examples" / "tiny_moe_cpu.yaml", ["data.reward_modules=[my_rewards]"])
    check_run_inputs(cfg)  # what minpro-train and minpro-eval do at start: imports the module
    assert grader_name("yes_no") == "yes-no prefix"
    assert reward("yes_no", "Yes, it is", "yes") == 1.0 and reward("yes_no", "No", "yes") == 0.0


def test_schema_examples_of_the_doc_load(tmp_path) -> None:
    (rows,) = [b for b in _blocks("json")]
    path = tmp_path / "rows.jsonl"
    path.write_text(rows)
    problems = load_problems(path)
    assert [p.data_source for p in problems] == ["math", "math", "arithmetic"]
    assert [p.answer for p in problems] == ["5", "46", "46"]

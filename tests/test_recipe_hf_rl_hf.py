"""docs/recipe_hf_rl_hf.md end to end: its bash blocks are run exactly as written (``python`` is this
interpreter, ``$WORK`` a temporary folder), in order: a tiny HF Qwen3-MoE -> RL with the Megatron learner
-> HF export -> transformers; then the convert-once variant that starts a run from a model-only checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "recipe_hf_rl_hf.md"


def doc_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        if text.lstrip().startswith('python -c "'):  # one multi-line command
            commands.append(text.strip())
            continue
        commands += [line.strip() for line in text.splitlines() if line.strip()]
    return commands


def test_recipe_runs_as_documented(tmp_path) -> None:
    commands = doc_commands()
    assert len(commands) == 6 and all(c.startswith("python ") for c in commands)
    env = {**os.environ, "WORK": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    outputs = []
    for cmd in commands:
        proc = subprocess.run(["bash", "-c", cmd.replace("python ", f"{sys.executable} ", 1)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    make, train, export, load, convert, restart = outputs
    assert "model: architecture from" in train and "model.hidden_size 128 -> 64" in train
    assert f"loaded weights from {tmp_path}/qwen3-moe-hf" in train
    cfg = json.loads((tmp_path / "rl-hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["hidden_size"] == 64
    assert load.startswith("Qwen3MoeForCausalLM 4 experts: ")
    assert (tmp_path / "rl-run" / "summary.md").is_file()
    assert f"starting a new run from the weights of {tmp_path}/qwen3-moe-mcore/iter_0000000" in restart
    assert "no warm start" in restart and "loaded weights from" not in restart
    assert (tmp_path / "rl-run-2" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2"

"""The GPU check's parts a (learner step vs the CPU fp32 reference), b1 (exporter) and d (chunked
log-probs) run end to end on the CPU at small sizes: the same workers, comparisons and report as on a
GPU, with real megatron-core in child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_rehearsal_passes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--small", "--parts", "a,d",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["part"]: r for r in report["results"]}
    assert rows["a local fp32 on cpu vs CPU fp32"]["status"] == "PASS"
    # the same fp32 computation on the same device is deterministic: bit-identical
    assert rows["a local fp32 on cpu vs CPU fp32"]["values"]["loss_max_abs"] == 0.0
    bf16 = rows["a local bf16 on cpu vs CPU fp32"]
    assert bf16["status"] == "PASS" and 0.0 < bf16["values"]["logp_max_abs"] < 0.1  # bf16 really differs
    (d,) = [r for r in report["results"] if r["part"].startswith("d ")]
    assert d["status"] == "PASS"
    assert "passed, 0 failed" in proc.stdout

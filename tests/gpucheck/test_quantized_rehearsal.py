"""The GPU check's part e rehearsed on the CPU (``tools/gpu_check.py --device cpu --small --parts e``): a real
SGLang CPU server boots from a dequantized fp8 export, receives another policy's fp8 buckets (dequantized to
fp32) through the gloo distributed transport, and the probe matches the dequantized references to 1e-4 while
the server has visibly left the first policy. What the CPU cannot run (real fp8 kernels, fp8 buckets into
SGLang's transformed fp8 layers, NCCL) is the GPU run of the same part (docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

pytest.importorskip("modelopt.torch.quantization")

ROOT = Path(__file__).resolve().parents[2]


def test_part_e_rehearsal_in_dequantized_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--small", "--parts", "e",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (row,) = json.loads((tmp_path / "report.json").read_text())["results"]
    print(row["figure"])
    v = row["values"]
    assert row["status"] == "PASS" and row["part"].startswith("e ")
    assert v["boot_max_abs"] <= 1e-4 and v["sync_max_abs"] <= 1e-4
    assert v["stale_max_abs"] > 0.01 and v["learner_max_abs"] > 10 * v["sync_max_abs"]  # fp8 mismatch is there
    assert v["buckets"] >= 4  # mixed buckets, not one
    # dequantized mode sends fp32 weights; the fp8 format would be about half of bf16
    assert v["sent_bytes"] > v["bf16_bytes"] and 0.5 < v["fp8_over_bf16"] < 0.75
    assert "dequantized fp8" in row["figure"]

"""The GPU check's CPU-runnable logic: comparisons against tolerances, the report, the exit code, the
environment probe, and the CLI's --help (which must document every part)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minpro_megatron.gpucheck import CheckResult, Status, compare, exit_code, render_report
from minpro_megatron.gpucheck.environment import detect_environment, probe_import
from minpro_megatron.gpucheck.parts import PARTS, _learner_comparisons

ROOT = Path(__file__).resolve().parents[2]


def test_compare_absolute_and_relative_bounds():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert compare(a, a, atol=0.0).ok
    near = compare(a + 1e-5, a, atol=1e-4)
    assert near.ok and near.max_abs == pytest.approx(1e-5, rel=1e-3)
    far = compare(a + 1e-3, a, atol=1e-4)
    assert not far.ok and far.max_abs == pytest.approx(1e-3, rel=1e-3)
    # relative bound: 1000 vs 1001 is 1e-3 relative, far above an absolute 1e-4
    assert compare([1001.0], [1000.0], atol=1e-4, rtol=2e-3).ok
    assert not compare([1001.0], [1000.0], atol=1e-4, rtol=5e-4).ok


def test_compare_rejects_shape_mismatch_and_non_finite():
    assert not compare([1.0, 2.0], [1.0], atol=1.0).ok
    assert compare([1.0, 2.0], [1.0], atol=1.0).figure() == "shape mismatch"
    bad = compare([math.nan], [1.0], atol=1e9)
    assert not bad.ok and "non-finite" in bad.figure()
    assert not compare([1.0], [math.inf], atol=1e9).ok


def _run(**changes) -> dict:
    base = {"logp_before": [-3.4, -3.5, -3.3], "logp_after": [-3.2, -3.6, -3.1], "loss": -1.09, "grad_norm": 1.6}
    base.update(changes)
    return base


def test_learner_tolerances_fp32_and_bf16():
    ref = _run()
    assert all(c.ok for c in _learner_comparisons(_run(loss=-1.09 * (1 + 5e-5)), ref, bf16=False).values())
    # a 1e-3 relative loss error is a pass in bf16 and a fail in fp32
    off = _run(loss=-1.09 * (1 + 1e-3))
    assert not _learner_comparisons(off, ref, bf16=False)["loss"].ok
    assert _learner_comparisons(off, ref, bf16=True)["loss"].ok
    # log-probs off by 0.05: bf16 tolerance, not fp32
    shifted = _run(logp_before=[x + 0.05 for x in ref["logp_before"]])
    assert not _learner_comparisons(shifted, ref, bf16=False)["logp"].ok
    assert _learner_comparisons(shifted, ref, bf16=True)["logp"].ok
    assert not _learner_comparisons(_run(grad_norm=2.0), ref, bf16=True)["grad_norm"].ok


def test_report_and_exit_code():
    ok = CheckResult.from_comparisons("a fp32", {"loss": compare(1.0, 1.0, atol=0.0)})
    bad = CheckResult.from_comparisons("d logp", {"logp": compare([0.0], [1.0], atol=0.1)})
    skip = CheckResult("a transformer_engine fp32", Status.SKIP, "transformer_engine not importable")
    assert ok.status is Status.PASS and bad.status is Status.FAIL
    text = render_report([ok, bad, skip], header="h")
    assert text.splitlines()[0] == "h"
    assert "FAIL  d logp" in text and "SKIP  a transformer_engine" in text
    assert text.splitlines()[-1] == "1 passed, 1 failed, 1 skipped"
    assert exit_code([ok, skip]) == 0
    assert exit_code([ok, bad]) == 1
    assert exit_code([ok, skip], require=["a transformer_engine"]) == 1  # a required part may not skip


def test_probe_import_reports_the_error():
    assert probe_import("json") != "" and not probe_import("json").startswith("absent")
    missing = probe_import("no_such_module_minpro")
    assert missing.startswith("absent") and "no_such_module_minpro" in missing


def test_detect_environment_on_cpu():
    env = detect_environment(optional=("json", "no_such_module_minpro"))
    assert env.torch == torch.__version__
    assert env.cuda_available == torch.cuda.is_available()
    assert env.has("json") and not env.has("no_such_module_minpro")
    assert "torch" in env.summary()


def test_help_documents_every_part():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key, (title, _) in PARTS.items():
        assert f"  {key}  {title}" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--parts", "a,z"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown part(s) ['z']" in bad.stderr

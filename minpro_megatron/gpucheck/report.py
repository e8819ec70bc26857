"""Results of the GPU check: one line per part with a figure and PASS / FAIL / SKIP.

A part FAILs when a comparison exceeds its tolerance or the part raised; it is SKIPped only when a
prerequisite is absent (no CUDA, TransformerEngine or SGLang not importable), and the reason says which.
The exit code is non-zero on any FAIL (a SKIP is not a pass: ``--require`` turns named skips into fails).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Iterable, Sequence

import torch

__all__ = ["Status", "Comparison", "CheckResult", "compare", "render_report", "exit_code", "results_to_json"]


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Comparison:
    """max |a - b| and max |a - b| / max(|b|, floor) of two tensors against absolute / relative bounds."""

    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    shape_ok: bool = True
    finite: bool = True

    @property
    def ok(self) -> bool:
        # every element must be within atol OR within rtol (as numpy.isclose, without the sum)
        return self.shape_ok and self.finite and (self.max_abs <= self.atol or self.max_rel <= self.rtol)

    def figure(self) -> str:
        if not self.shape_ok:
            return "shape mismatch"
        if not self.finite:
            return "non-finite values"
        return f"max|d|={self.max_abs:.3g} (atol {self.atol:g}), rel={self.max_rel:.3g} (rtol {self.rtol:g})"


def compare(
    actual: torch.Tensor | Sequence[float] | float,
    expected: torch.Tensor | Sequence[float] | float,
    *,
    atol: float,
    rtol: float = 0.0,
    rel_floor: float = 1e-12,
) -> Comparison:
    """Compare in float64. Relative error divides by max(|expected|, rel_floor) element-wise."""
    a = torch.as_tensor(actual, dtype=torch.float64).detach().cpu().reshape(-1)
    b = torch.as_tensor(expected, dtype=torch.float64).detach().cpu().reshape(-1)
    if a.shape != b.shape:
        return Comparison(math.inf, math.inf, atol, rtol, shape_ok=False)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return Comparison(math.inf, math.inf, atol, rtol, finite=False)
    if a.numel() == 0:
        return Comparison(0.0, 0.0, atol, rtol)
    diff = (a - b).abs()
    rel = diff / b.abs().clamp_min(rel_floor)
    return Comparison(float(diff.max()), float(rel.max()), atol, rtol)


@dataclass
class CheckResult:
    part: str  # e.g. "a1 learner fp32 (local spec) vs CPU fp32"
    status: Status
    figure: str = ""
    detail: str = ""
    seconds: float = 0.0
    values: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_comparisons(cls, part: str, comparisons: dict[str, Comparison], **kw) -> "CheckResult":
        ok = all(c.ok for c in comparisons.values())
        figure = "; ".join(f"{k}: {c.figure()}" for k, c in comparisons.items())
        values = {f"{k}_max_abs": c.max_abs for k, c in comparisons.items()}
        return cls(part, Status.PASS if ok else Status.FAIL, figure, values=values, **kw)


def render_report(results: Iterable[CheckResult], header: str = "") -> str:
    results = list(results)
    lines = [header] if header else []
    width = max((len(r.part) for r in results), default=10)
    for r in results:
        line = f"{r.status.value:4s}  {r.part:<{width}s}  {r.figure}"
        if r.seconds:
            line += f"  [{r.seconds:.1f} s]"
        lines.append(line)
        if r.detail:
            lines.extend("      " + d for d in r.detail.rstrip().splitlines()[-12:])
    counts = {s: sum(r.status is s for r in results) for s in Status}
    lines.append(f"{counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped")
    return "\n".join(lines)


def exit_code(results: Iterable[CheckResult], require: Sequence[str] = ()) -> int:
    """1 if any part failed, or if a part whose name starts with one of ``require`` was skipped."""
    for r in results:
        if r.status is Status.FAIL:
            return 1
        if r.status is Status.SKIP and any(r.part.startswith(p) for p in require):
            return 1
    return 0


def results_to_json(results: Iterable[CheckResult], environment: dict) -> str:
    rows = [{**asdict(r), "status": r.status.value} for r in results]
    return json.dumps({"environment": environment, "results": rows}, indent=2, default=str)

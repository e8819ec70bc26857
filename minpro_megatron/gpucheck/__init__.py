"""The prepared GPU check (``tools/gpu_check.py``): environment detection, tensor comparisons with
stated tolerances, and the PASS / FAIL / SKIP report. The parts themselves live in ``parts.py``; this
package's logic is CPU-testable (tests/gpucheck/)."""

from minpro_megatron.gpucheck.environment import Environment, detect_environment
from minpro_megatron.gpucheck.report import CheckResult, Comparison, Status, compare, exit_code, render_report

__all__ = [
    "CheckResult",
    "Comparison",
    "Environment",
    "Status",
    "compare",
    "detect_environment",
    "exit_code",
    "render_report",
]

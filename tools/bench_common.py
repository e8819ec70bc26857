"""Shared by the tools/bench_*.py scripts: one result line per measured ratio, and a quiet profiler.

``report`` prints a human line ("ratio ... target ... met") and a machine line ``BENCH_RESULT {json}``
that tools/run_benchmarks.py collects into one markdown table (docs/benchmarks.md).
``quiet_native_stderr`` hides the lines torch's kineto profiler writes straight to file descriptor 2 on a
CPU-only host (``USDT: ... profiler_start``, ``ERROR: ... gpuGetDeviceCount failed``); Python's own
stderr and any other native line still come through.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from typing import Iterator

__all__ = ["report", "quiet_native_stderr", "RESULT_PREFIX"]

RESULT_PREFIX = "BENCH_RESULT "
# kineto's glog-style lines: "USDT:2026-11-30 12:15:27 28393:28393 SyncActivityProfilerHandler.cpp:39] ..."
_KINETO = re.compile(r"^(USDT|STAGE|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\]")


def report(bench: str, setting: str, measured: str, target: str, met: bool | None, note: str = "") -> None:
    """One result of a benchmark: ``measured`` and ``target`` are short texts ("0.93x raw broadcast",
    ">= 0.8x"); ``met`` None means the row has no target (context only)."""
    verdict = {True: "met", False: "MISSED", None: "-"}[met]
    print(f"result: {bench} [{setting}]: {measured} (target {target or '-'}: {verdict}){' - ' + note if note else ''}", flush=True)
    row = dict(bench=bench, setting=setting, measured=measured, target=target, met=met, note=note)
    print(RESULT_PREFIX + json.dumps(row), flush=True)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Route fd 2 into a temp file for the block, then replay every line that is not kineto noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines() if not _KINETO.match(ln)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()

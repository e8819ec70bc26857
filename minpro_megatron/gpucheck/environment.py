"""What the machine offers the GPU check: torch/CUDA/NCCL, megatron-core, TransformerEngine, SGLang.

Optional packages are probed by *importing* them in a child process: ``find_spec`` answers True for an
installed-but-broken TransformerEngine (its import raises without matching CUDA libraries, and a failed
TE import inside this process would also break ``import megatron.core``).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Environment", "detect_environment", "probe_import"]


@dataclass
class Environment:
    python: str
    torch: str
    cuda_available: bool
    device_name: str = ""
    capability: str = ""
    memory_gib: float = 0.0
    nccl: str = ""
    packages: dict[str, str] = field(default_factory=dict)  # name -> version, or "absent: <why>"

    def has(self, name: str) -> bool:
        return not self.packages.get(name, "absent").startswith("absent")

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dev = f"{self.device_name} (sm_{self.capability}, {self.memory_gib:.0f} GiB)" if self.cuda_available else "no CUDA device"
        pk = ", ".join(f"{k} {v}" for k, v in self.packages.items())
        return f"python {self.python}, torch {self.torch}, {dev}, NCCL {self.nccl or '-'}; {pk}"


def probe_import(module: str, timeout_s: float = 120.0) -> str:
    """The module's ``__version__`` if ``import module`` succeeds in a fresh interpreter, else
    ``'absent: <last line of the error>'``."""
    code = f"import {module} as m; print(getattr(m, '__version__', 'unknown'))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"absent: import {module} took over {timeout_s:.0f} s"
    if proc.returncode == 0:
        return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "unknown"
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return f"absent: {err[-1] if err else f'exit code {proc.returncode}'}"


def detect_environment(optional: tuple[str, ...] = ("megatron.core", "transformer_engine", "sglang")) -> Environment:
    env = Environment(
        python=".".join(map(str, sys.version_info[:3])),
        torch=torch.__version__,
        cuda_available=torch.cuda.is_available(),
    )
    if env.cuda_available:
        props = torch.cuda.get_device_properties(0)
        env.device_name = props.name
        env.capability = f"{props.major}{props.minor}"
        env.memory_gib = props.total_memory / 2**30
        try:
            env.nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # a torch build without NCCL
            env.nccl = f"absent: {exc}"
    env.packages = {name: probe_import(name) for name in optional}
    return env

"""What an SGLang server process needs to run on a host without CUDA.

* ``SGLANG_USE_CPU_ENGINE=1``: without it SGLang's model construction imports vLLM's CUDA ops.
* The pure-torch ``sgl_kernel`` stand-in (``sgl_kernel_standin/``), made visible by prepending its
  parent directory to the *server's* PYTHONPATH only. It is never installed into site-packages, so the
  learner, tests and any CUDA host keep whatever real sgl_kernel they have.
* CPU launch flags: ``--device cpu --attention-backend torch_native --disable-cuda-graph``.

Every use is announced with a loud warning in the log.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

__all__ = ["STANDIN_DIR", "cuda_available", "server_env", "cpu_server_args", "uses_standin"]

log = logging.getLogger(__name__)

# The directory that holds the stand-in package ``sgl_kernel/``; it goes on the server's PYTHONPATH.
STANDIN_DIR = Path(__file__).resolve().parent / "sgl_kernel_standin"


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when torch sees a usable CUDA device (cached; the answer does not change in a run)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install counts as "no CUDA": the CPU path is what can still run
        return False


def uses_standin(device: str) -> bool:
    """The stand-in is used exactly when the server runs on CPU and the host has no CUDA."""
    return device == "cpu" and not cuda_available()


def server_env(device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for one SGLang server process.

    device='cpu' sets SGLANG_USE_CPU_ENGINE=1, and on hosts without CUDA prepends the stand-in to
    PYTHONPATH (with a loud warning). device='cuda' returns ``base`` unchanged (real sgl-kernel).
    """
    env = dict(os.environ if base is None else base)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"server device={device!r}: choose 'cpu' or 'cuda'")
    if device == "cuda":
        return env
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    if uses_standin(device):
        if not (STANDIN_DIR / "sgl_kernel" / "__init__.py").is_file():
            raise FileNotFoundError(
                f"the sgl_kernel stand-in is missing at {STANDIN_DIR}/sgl_kernel/__init__.py; "
                "reinstall minpro_megatron from a full checkout (the package data was not shipped)"
            )
        parts = [str(STANDIN_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        log.warning(
            "NO CUDA on this host: SGLang servers will import the pure-torch sgl_kernel STAND-IN from %s "
            "(PYTHONPATH of the server processes only). Fine for protocol tests, not for throughput.",
            STANDIN_DIR,
        )
    return env


def cpu_server_args() -> list[str]:
    """Launch flags that make SGLang's CPU path work (measured with sglang 0.5.23)."""
    # --sleep-on-idle: without it the idle scheduler busy-polls one core at 100% (measured), which on a
    # 2-core host starves everything else (the learner, the other server, the tests).
    return ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--sleep-on-idle"]

"""What an SGLang server process needs to run on a host without CUDA.

* ``SGLANG_USE_CPU_ENGINE=1``: without it SGLang's model construction imports vLLM's CUDA ops.
* The pure-torch ``sgl_kernel`` stand-in (``sgl_kernel_standin/``), made visible by prepending its
  parent directory to the *server's* PYTHONPATH only. It is never installed into site-packages, so the
  learner, tests and any CUDA host keep whatever real sgl_kernel they have.
* CPU launch flags: ``--device cpu --attention-backend torch_native --disable-cuda-graph``.

Every use is announced with a loud warning in the log.

Servers started outside ``serving/server.py`` (``launch_slurm/rollout.sh`` on a rollout node) get the same
settings from the command line, so the flags live only here:

    eval "$(python -m minpro_megatron.serving.cpu_support --shell --device auto -- SERVER_ARGS...)"
    # -> SERVER_DEVICE=cpu  SERVER_ENV=(SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=...)  SERVER_ARGS=(--device cpu ...)
    python -m minpro_megatron.serving.cpu_support --device cpu --print-args   # or --print-env
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["STANDIN_DIR", "cuda_available", "server_env", "cpu_server_args", "uses_standin", "resolve_device",
           "cpu_default_args", "launch_settings", "main"]

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


# ServerLaunchSpec's CPU defaults (serving/server.py), for servers launched from the command line
CPU_DEFAULTS = {"--mem-fraction-static": "0.5", "--max-total-tokens": "4096"}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU on this host, else 'cpu'; 'cpu' / 'cuda' unchanged."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"server device={device!r}: choose 'auto', 'cpu' or 'cuda' (rollout.server_device)")
    return device


def cpu_default_args(given: Sequence[str] = ()) -> list[str]:
    """The CPU defaults of memory fraction and KV-cache size whose flag is not already in ``given``."""
    out: list[str] = []
    for flag, value in CPU_DEFAULTS.items():
        if not any(a == flag or a.startswith(flag + "=") for a in given):
            out += [flag, value]
    return out


def launch_settings(device: str, given: Sequence[str] = (), base: dict[str, str] | None = None
                    ) -> tuple[str, dict[str, str], list[str]]:
    """(resolved device, environment variables to set, extra launch flags) for one SGLang server whose own
    arguments are ``given``. On GPU: no changes. The environment holds only what differs from ``base``."""
    resolved = resolve_device(device)
    base = dict(os.environ if base is None else base)
    if resolved == "cuda":
        return resolved, {}, []
    env = server_env(resolved, base)
    changed = {k: v for k, v in env.items() if base.get(k) != v}
    return resolved, changed, cpu_server_args() + cpu_default_args(given)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.serving.cpu_support",
                                 description="SGLang's CPU-engine settings for a server launched from a shell.")
    ap.add_argument("--device", default="auto", help="auto (cpu when torch sees no GPU), cpu or cuda")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shell", action="store_true", help="bash: SERVER_DEVICE=..., SERVER_ENV=(...), SERVER_ARGS=(...)")
    mode.add_argument("--print-args", action="store_true", help="the extra launch flags, one shell-quoted line")
    mode.add_argument("--print-env", action="store_true", help="the environment to set, one KEY=VALUE per line")
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: the server's own arguments "
                    "(a CPU default is left out when its flag is among them)")
    args = ap.parse_args(argv)
    given = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    try:
        device, env, extra = launch_settings(args.device, given)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shell:
        print(f"SERVER_DEVICE={device}")
        print(f"SERVER_ENV=({' '.join(shlex.quote(f'{k}={v}') for k, v in env.items())})")
        print(f"SERVER_ARGS=({' '.join(shlex.quote(a) for a in extra)})")
    elif args.print_args:
        print(" ".join(shlex.quote(a) for a in extra))
    else:
        for k, v in env.items():
            print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry points (``minpro-train``, ``minpro-sweep``, ``minpro-eval``, ``minpro-slurm``) and
``python -m minpro_megatron.cli <command> ...``.

Every command prints a mistake in its input as one line ``error: ...`` and exits 2 (cli_support.py);
``--debug`` or MINPRO_DEBUG=1 shows the traceback."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["train_main", "sweep_main", "eval_main", "slurm_main", "bench_losses_main", "samples_main", "main"]

def _run(module: str, argv: list[str] | None) -> int:
    """Run ``module.main`` with one-line errors (cli_support.run_cli); imports stay lazy."""
    import importlib

    from minpro_megatron.cli_support import run_cli
    from minpro_megatron.parallel.cpu_compat import filter_cpu_startup_warnings

    filter_cpu_startup_warnings()  # before any megatron import prints the TE/apex-absent messages
    return run_cli(importlib.import_module(module).main, sys.argv[1:] if argv is None else argv)


def train_main(argv: list[str] | None = None) -> int:
    return _run("minpro_megatron.train.trainer", argv)


def sweep_main(argv: list[str] | None = None) -> int:
    return _run("minpro_megatron.sweep", argv)


def eval_main(argv: list[str] | None = None) -> int:
    return _run("minpro_megatron.eval.passk", argv)


def slurm_main(argv: list[str] | None = None) -> int:
    return _run("minpro_megatron.slurm.submit", argv)


def samples_main(argv: list[str] | None = None) -> int:
    return _run("minpro_megatron.metrics.samples", argv)


def bench_losses_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_losses.py"
    sys.argv = [str(tool), *argv]
    runpy.run_path(str(tool), run_name="__main__")
    return 0


_COMMANDS = {"train": train_main, "sweep": sweep_main, "eval": eval_main, "slurm": slurm_main, "bench-losses": bench_losses_main,
             "samples": samples_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in _COMMANDS:
        what = f"unknown command {argv[0]!r}; " if argv else ""
        print(f"error: {what}usage: python -m minpro_megatron.cli {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

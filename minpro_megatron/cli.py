"""Command-line entry points (``minpro-train``, ``minpro-sweep``, ``minpro-eval``, ``minpro-slurm``) and
``python -m minpro_megatron.cli <command> ...``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["train_main", "sweep_main", "eval_main", "slurm_main", "bench_losses_main", "main"]

def train_main(argv: list[str] | None = None) -> int:
    from minpro_megatron.trainer import main

    return main(sys.argv[1:] if argv is None else argv)


def sweep_main(argv: list[str] | None = None) -> int:
    from minpro_megatron.sweep import main

    return main(sys.argv[1:] if argv is None else argv)


def eval_main(argv: list[str] | None = None) -> int:
    from minpro_megatron.eval.passk import main

    return main(sys.argv[1:] if argv is None else argv)


def slurm_main(argv: list[str] | None = None) -> int:
    from minpro_megatron.slurm.submit import main

    return main(sys.argv[1:] if argv is None else argv)


def bench_losses_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_losses.py"
    sys.argv = [str(tool), *argv]
    runpy.run_path(str(tool), run_name="__main__")
    return 0


_COMMANDS = {"train": train_main, "sweep": sweep_main, "eval": eval_main, "slurm": slurm_main, "bench-losses": bench_losses_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: python -m minpro_megatron.cli {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

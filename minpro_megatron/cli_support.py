"""What every command-line tool shares: one-line errors, argument parsing that names unknown flags, and the
``--debug`` switch.

A mistake of the user (a ``UserError``: config, dataset, checkpoint or HF-weights errors, a missing file)
is printed as one line ``error: ...`` on stderr with exit code 2; the traceback only with ``--debug`` or
``MINPRO_DEBUG=1``. Anything else is a bug and keeps its traceback.

    def main(argv):                                    # raises UserError subclasses freely
        ...
    sys.exit(run_cli(main, sys.argv[1:]))
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, NoReturn, Sequence

from minpro_megatron.config.base import UserError

__all__ = ["UserError", "Parser", "run_cli", "debug_enabled", "require_file", "require_dir"]

DEBUG_ENV = "MINPRO_DEBUG"


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the options (before a ``--``) or MINPRO_DEBUG set to anything but 0/empty."""
    opts = list(argv)[: list(argv).index("--")] if "--" in argv else list(argv)
    return "--debug" in opts or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(exc: BaseException) -> str:
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


def run_cli(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)``: a UserError becomes ``error: <message>`` (one line, exit 2) unless debugging."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    if "--debug" in argv:
        cut = argv.index("--") if "--" in argv else len(argv)
        argv = [a for i, a in enumerate(argv) if not (i < cut and a == "--debug")]
    try:
        rc = fn(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error it already printed as one line (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(f"error: {exc.code}", file=sys.stderr, flush=True)
        return 2
    except UserError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    return 0 if rc is None else int(rc)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, no abbreviations, unknown flags named before anything else (so
    ``--checkpont`` is reported as the typo it is, not as "--checkpoint is required"), and ``--debug``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or {DEBUG_ENV}=1)")

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)

    def _known_flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings]

    def check_flags(self, argv: Sequence[str]) -> None:
        known = self._known_flags()
        for arg in argv:
            if arg == "--":
                break
            if not arg.startswith("-") or arg == "-" or _is_number(arg):
                continue
            flag = arg.split("=", 1)[0] if arg.startswith("--") else arg
            if flag not in known:
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                self.error(f"unknown option {flag}" + (f" (did you mean {close[0]}?)" if close else ""))

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        self.check_flags(args)
        return super().parse_args(args, namespace)

    def parse_intermixed_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        self.check_flags(args)
        return super().parse_intermixed_args(args, namespace)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def require_file(path: str | os.PathLike, what: str) -> None:
    """A UserError naming ``what`` (e.g. "data.train_path") unless ``path`` is an existing file."""
    if not os.path.isfile(path):
        hint = " (it is a directory)" if os.path.isdir(path) else ""
        raise UserError(f"{what}: file {str(path)!r} does not exist{hint}")


def require_dir(path: str | os.PathLike, what: str) -> None:
    if not os.path.isdir(path):
        hint = " (it is a file)" if os.path.isfile(path) else ""
        raise UserError(f"{what}: directory {str(path)!r} does not exist{hint}")

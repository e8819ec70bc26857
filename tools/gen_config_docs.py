#!/usr/bin/env python
"""Regenerate docs/config.md from the config dataclasses (minpro_megatron/config/docs.py).

    python tools/gen_config_docs.py            # writes docs/config.md
    python tools/gen_config_docs.py --check    # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def generate() -> str:
    from minpro_megatron.config import RunConfig
    from minpro_megatron.config.docs import render_markdown

    return render_markdown(RunConfig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    a = p.parse_args(argv)
    text = generate()
    if a.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

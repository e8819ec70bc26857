#!/usr/bin/env python
"""GSM8K- or MATH-style rows -> the trainer's and minpro-eval's JSONL schema (docs/data.md).

    python tools/prep_math_data.py --format gsm8k --in examples/data/gsm8k_style.jsonl --out data/gsm8k_train.jsonl
    python tools/prep_math_data.py --format math --in examples/data/math_style.jsonl --out data/math_eval.jsonl --chat

GSM8K rows: {"question", "answer": "...reasoning...\\n#### 72"}: the final answer follows "####" (commas
dropped). MATH rows: {"problem", "solution": "... \\boxed{...}"}: the final answer is the last \\boxed{}.
Every output row is {"prompt", "answer", "data_source": "math"}: math-verify grades the response's last
\\boxed{} against the answer. ``--chat`` writes the prompt as a list of chat messages, for
``data.chat_template: true`` with an instruct model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

INSTRUCTION = "Solve the problem step by step and put the final answer in \\boxed{}."


def gsm8k_answer(text: str) -> str:
    if "####" not in text:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def math_answer(solution: str) -> str:
    from minpro_megatron.rewards import extract_boxed

    boxed = extract_boxed(solution)
    if boxed is None:
        raise ValueError("a MATH solution must contain \\boxed{...}")
    return boxed.strip()


def convert_row(row: dict, fmt: str, chat: bool) -> dict:
    question, answer = (row["question"], gsm8k_answer(row["answer"])) if fmt == "gsm8k" else (
        row["problem"], math_answer(row["solution"]))
    text = f"{INSTRUCTION}\n\n{question.strip()}"
    prompt = [{"role": "user", "content": text}] if chat else text
    return {"prompt": prompt, "answer": answer, "data_source": "math"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=["gsm8k", "math"], required=True)
    p.add_argument("--in", dest="inp", required=True, help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--chat", action="store_true", help="prompts as chat messages (data.chat_template: true)")
    a = p.parse_args(argv)
    rows = []
    for lineno, line in enumerate(Path(a.inp).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(convert_row(json.loads(line), a.format, a.chat))
            except (KeyError, ValueError) as exc:
                print(f"error: {a.inp}:{lineno}: {exc}", file=sys.stderr)
                return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

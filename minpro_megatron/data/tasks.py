"""Synthetic verifiable tasks generated locally (the embedded default needs no downloads).

arithmetic: "ab+cd=" -> the sum (zero-padded 2-digit operands), answered by the digits then EOS.
sorting:    "sort 5,1,4=" style prompts over digits -> the digits in order.
Train and eval sets are disjoint: a fixed, seeded hold-out of problems never appears in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Problem", "arithmetic_problems", "sorting_problems", "task_split"]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    data_source: str
    origin: str = field(default="", compare=False)  # "FILE line N" for rows read from a file (for messages)


def arithmetic_problems() -> list[Problem]:
    return [Problem(f"{a:02d}+{b:02d}=", str(a + b), "arithmetic") for a in range(100) for b in range(100)]


def sorting_problems(n_digits: int = 5, count: int = 20_000, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
        if digits in seen:
            continue
        seen.add(digits)
        out.append(Problem(f"{','.join(digits)}=", "".join(sorted(digits)), "sorting"))
    return out


def task_split(task: str, num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of a synthetic task; the eval hold-out is a seeded sample."""
    if task == "arithmetic":
        problems = arithmetic_problems()
    elif task == "sorting":
        problems = sorting_problems(seed=seed)
    else:
        raise ValueError(f"data.task={task!r} is not a synthetic task; choose arithmetic or sorting (or jsonl)")
    if not 0 < num_eval < len(problems):
        raise ValueError(f"data.num_eval={num_eval} must be between 1 and {len(problems) - 1}")
    rng = random.Random(seed)
    order = list(range(len(problems)))
    rng.shuffle(order)
    held = set(order[:num_eval])
    return [p for i, p in enumerate(problems) if i not in held], [problems[i] for i in order[:num_eval]]

"""Synthetic verifiable tasks generated locally (the embedded default needs no downloads).

arithmetic: "ab+cd=" -> the sum (zero-padded 2-digit operands), answered by the digits then EOS.
sorting:    "5,1,4=" style prompts over digits -> the digits in order ("145").
reverse:    "51408=" -> the digits reversed ("80415"). With ``length`` >= 32 the answer is >= 33 generated
            tokens (digits + EOS), long enough for a prefix correction to matter (docs/staleness_study.md).
Train and eval sets are disjoint: a fixed, seeded hold-out of problems never appears in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Problem", "arithmetic_problems", "sorting_problems", "reverse_problems", "task_split", "SYNTHETIC_TASKS"]

SYNTHETIC_TASKS = ("arithmetic", "sorting", "reverse")


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


def _distinct_digit_strings(n_digits: int, count: int, seed: int) -> list[str]:
    if n_digits < 1:
        raise ValueError(f"data.task_length={n_digits} must be >= 1")
    if count > 10**n_digits:
        raise ValueError(f"{count} distinct problems need more than {n_digits} digits; raise data.task_length")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
        if digits not in seen:
            seen.add(digits)
            out.append(digits)
    return out


def reverse_problems(n_digits: int = 32, count: int = 20_000, seed: int = 0) -> list[Problem]:
    """Distinct random digit strings; the answer is the string reversed (one token per digit)."""
    return [Problem(f"{d}=", d[::-1], "reverse") for d in _distinct_digit_strings(n_digits, count, seed)]


def task_split(task: str, num_eval: int, seed: int, length: int | None = None,
               count: int = 20_000) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of a synthetic task; the eval hold-out is a seeded sample.
    ``length``: digits per problem of sorting / reverse (None: 5 for sorting, 32 for reverse)."""
    if length is not None and length < 1:
        raise ValueError(f"data.task_length={length} must be >= 1 (or null for the task's default)")
    if task == "arithmetic":
        problems = arithmetic_problems()
    elif task == "sorting":
        problems = sorting_problems(n_digits=length or 5, count=min(count, 10 ** (length or 5) // 2), seed=seed)
    elif task == "reverse":
        problems = reverse_problems(n_digits=length or 32, count=min(count, 10 ** (length or 32) // 2), seed=seed)
    else:
        raise ValueError(f"data.task={task!r} is not a synthetic task; choose one of {', '.join(SYNTHETIC_TASKS)} (or jsonl)")
    if not 0 < num_eval < len(problems):
        raise ValueError(f"data.num_eval={num_eval} must be between 1 and {len(problems) - 1}")
    rng = random.Random(seed)
    order = list(range(len(problems)))
    rng.shuffle(order)
    held = set(order[:num_eval])
    return [p for i, p in enumerate(problems) if i not in held], [problems[i] for i in order[:num_eval]]

"""Verifiable rewards, chosen by each problem's ``data_source`` through a registry.

- arithmetic / sorting / reverse: exact match of the response (whitespace removed) with the answer.
- math, and any data_source nobody registered: math-verify's parse + verify of the final answer (the last
  \\boxed{...}, or the whole response); with ``strict_format`` a response without \\boxed{} scores 0.
Rewards are 1.0 for correct, 0.0 otherwise (a registered function may return any float).

A new reward: ``register_reward("my_source", fn, grader="my-grader")`` with
``fn(response, answer, strict_format) -> float``, in a module the run imports through
``data.reward_modules`` (docs/data.md).
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["reward", "exact_match", "math_reward", "extract_boxed", "register_reward", "grader_name",
           "registered_sources", "RewardFn", "DEFAULT_GRADER"]

RewardFn = Callable[[str, str, bool], float]  # (response, answer, strict_format) -> reward
DEFAULT_GRADER = "math-verify"


def exact_match(response: str, answer: str) -> float:
    return 1.0 if response.strip() == answer.strip() else 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def math_reward(response: str, answer: str, strict_format: bool = False) -> float:
    from math_verify import parse, verify

    boxed = extract_boxed(response)
    if boxed is None and strict_format:
        return 0.0
    candidate = f"\\boxed{{{boxed}}}" if boxed is not None else response
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    try:
        return 1.0 if verify(gold, parse(candidate)) else 0.0
    except Exception:  # math-verify raises on unparsable input: an unparsable answer is wrong
        return 0.0


_WS = re.compile(r"\s+")


def _exact_no_ws(response: str, answer: str, strict_format: bool = False) -> float:
    return exact_match(_WS.sub("", response), answer)


_REGISTRY: dict[str, tuple[RewardFn, str]] = {
    "arithmetic": (_exact_no_ws, "exact-match"),
    "sorting": (_exact_no_ws, "exact-match"),
    "reverse": (_exact_no_ws, "exact-match"),
    "math": (math_reward, DEFAULT_GRADER),
}


def register_reward(data_source: str, fn: RewardFn, grader: str | None = None) -> None:
    """Rows whose ``data_source`` is ``data_source`` are scored by ``fn(response, answer, strict_format)``;
    ``grader`` names it in logs and eval results (default: the function's name)."""
    if not data_source or not callable(fn):
        raise ValueError("register_reward needs a non-empty data_source and a callable")
    _REGISTRY[data_source] = (fn, grader or getattr(fn, "__name__", data_source))


def registered_sources() -> list[str]:
    return sorted(_REGISTRY)


def grader_name(data_source: str) -> str:
    """The grader that ``reward`` uses for ``data_source`` (math-verify for unregistered sources)."""
    entry = _REGISTRY.get(data_source)
    return entry[1] if entry else DEFAULT_GRADER


def reward(data_source: str, response: str, answer: str, strict_format: bool = False) -> float:
    fn, _ = _REGISTRY.get(data_source, (math_reward, DEFAULT_GRADER))
    return fn(response, answer, strict_format)

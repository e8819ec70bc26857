"""Verifiable rewards, chosen by each problem's ``data_source``.

- arithmetic / sorting / reverse: exact match of the response (up to the first EOS / whitespace) with the answer.
- math (default for files): math-verify's parse + verify of the final answer (the last \\boxed{...}, or
  the whole response); with ``strict_format`` a response without \\boxed{} scores 0.
Rewards are 1.0 for correct, 0.0 otherwise.
"""

from __future__ import annotations

import re

__all__ = ["reward", "exact_match", "math_reward", "extract_boxed"]


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


def reward(data_source: str, response: str, answer: str, strict_format: bool = False) -> float:
    if data_source in ("arithmetic", "sorting", "reverse"):
        return exact_match(_WS.sub("", response), answer)
    return math_reward(response, answer, strict_format)

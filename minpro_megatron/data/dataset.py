"""Prompt datasets: JSONL / parquet files with (prompt, answer, data_source) rows, or a synthetic task,
served in a seeded, resumable order.

Rows are validated when the file is read; a bad row raises one ``DatasetError`` naming the file, the row
and the field, with the fix. ``PromptStream`` hands out prompts epoch by epoch in a seeded shuffle; its
``state_dict`` (epoch, position) makes a killed run resume on the next unseen prompt.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from minpro_megatron.config.base import UserError
from minpro_megatron.data.tasks import SYNTHETIC_TASKS, Problem, task_split

__all__ = ["DatasetError", "load_problems", "PromptStream", "load_dataset_pair", "drop_overlong"]

log = logging.getLogger(__name__)


class DatasetError(ValueError, UserError):
    """A dataset file or row is unusable; the message names the file, row and field."""


def load_problems(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", source_key: str = "data_source",
    default_source: str = "math",
) -> list[Problem]:
    """Read a .jsonl / .json (one object per line) or .parquet file of problems. Rows without
    ``source_key`` get ``default_source`` (``""`` lets the caller see which rows had none)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[tuple[str, Any]] = [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one object") from None
    else:
        raise DatasetError(f"dataset file {str(path)!r}: unsupported extension {path.suffix!r}; use .jsonl or .parquet")
    problems = [_row(path, where, row, prompt_key, answer_key, source_key, default_source) for where, row in rows]
    if not problems:
        raise DatasetError(f"dataset file {str(path)!r} has no rows")
    return problems


def _row(path: Path, where: str, row: Any, prompt_key: str, answer_key: str, source_key: str,
         default_source: str = "math") -> Problem:
    if not isinstance(row, dict):
        raise DatasetError(f"{path} {where}: expected an object with {prompt_key!r} and {answer_key!r}, got {type(row).__name__}")
    prompt = row.get(prompt_key)
    if isinstance(prompt, list):  # chat format: [{"role": ..., "content": ...}]; the last user turn is the prompt
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
            raise DatasetError(f"{path} {where}: field {prompt_key!r} is a list but not of {{role, content}} messages")
        prompt = json.dumps(prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(
            f"{path} {where}: field {prompt_key!r} must be a non-empty string (got {prompt!r}); "
            f"set data.prompt_key if the column has another name"
        )
    answer = row.get(answer_key)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DatasetError(
            f"{path} {where}: field {answer_key!r} must be a non-empty string or number (got {answer!r}); "
            f"set data.answer_key if the column has another name"
        )
    source = row.get(source_key, default_source)
    if not isinstance(source, str):
        raise DatasetError(f"{path} {where}: field {source_key!r} must be a string, got {source!r}")
    return Problem(prompt, answer.strip(), source, origin=f"{path} {where}")


def drop_overlong(
    problems: Sequence[Problem], encode: Callable[[Problem], Sequence[int]], max_prompt_tokens: int, what: str
) -> tuple[list[Problem], list[str]]:
    """Tokenize every prompt now and drop those longer than ``max_prompt_tokens`` (a server answers them
    with HTTP 400, which would end the run mid-way). Returns (kept, one warning per dropped row, naming the
    file and row); raises DatasetError when nothing is left."""
    kept: list[Problem] = []
    notes: list[str] = []
    for i, p in enumerate(problems):
        n = len(encode(p))
        if n > max_prompt_tokens:
            notes.append(f"{p.origin or f'{what} problem {i}'}: prompt of {n} tokens is longer than the {max_prompt_tokens} "
                         "the context allows (model.max_position_embeddings - rollout.max_new_tokens); row dropped")
            log.warning(notes[-1])
        else:
            kept.append(p)
    if problems and not kept:
        raise DatasetError(f"every {what} prompt is longer than {max_prompt_tokens} tokens (model.max_position_embeddings - "
                           "rollout.max_new_tokens); raise model.max_position_embeddings or lower rollout.max_new_tokens")
    return kept, notes


def load_dataset_pair(data_cfg: Any, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems for a DataConfig: a synthetic task, or files."""
    if data_cfg.task in SYNTHETIC_TASKS:
        return task_split(data_cfg.task, data_cfg.num_eval, seed, length=getattr(data_cfg, "task_length", None))
    if not data_cfg.train_path:
        raise DatasetError("data.task=jsonl needs data.train_path (a .jsonl or .parquet file)")
    train = load_problems(data_cfg.train_path, data_cfg.prompt_key, data_cfg.answer_key)
    evals = load_problems(data_cfg.eval_path, data_cfg.prompt_key, data_cfg.answer_key) if data_cfg.eval_path else []
    return train, evals


@dataclass
class PromptStream:
    """Seeded epoch-by-epoch order over a problem list; resumable through state_dict()."""

    problems: Sequence[Problem]
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.problems:
            raise DatasetError("PromptStream needs at least one problem")
        self._order = self._shuffle(self.epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[Problem]:
        out = []
        while len(out) < count:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle(self.epoch)
            out.append(self.problems[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)

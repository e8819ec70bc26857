"""One sweep folder, one protocol: a finished cell counts as a result of the sweep being run, and runs are
collected into one table, only when their configs agree on everything but what the cells themselves vary.

The staleness study changed its warm-start rule after 29 cells (docs/staleness_study.md, "Amendment
(protocol v2)"): those cells live in runs_v1/. Without this check, re-running the amended grid into the
old folder would have skipped them as finished, and collecting both folders together would have averaged
the two protocols into one row."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from minpro_megatron.config import RunConfig, to_dict
from minpro_megatron.config.base import UserError
from minpro_megatron.config.resume import RESUME_MAY_CHANGE, flatten

__all__ = ["NOT_PROTOCOL", "protocol_differences", "cell_keys", "check_done_cells", "check_one_protocol"]

# Where a run's files go and how it is served do not change its results (config/resume.py); the length of
# the run and its evaluation points do.
NOT_PROTOCOL = tuple(k for k in RESUME_MAY_CHANGE if k not in ("train.steps", "train.eval_interval"))


def _filled(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config with the current defaults for fields it predates (a run made before a field
    existed ran with that field's default behaviour, e.g. train.warm_start_until_accuracy=0)."""
    return {**flatten(to_dict(RunConfig())), **flatten(cfg)}


def _ignored(key: str, extra: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in (*NOT_PROTOCOL, *extra))


def protocol_differences(a: Mapping[str, Any], b: Mapping[str, Any], vary: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every field the two configs set differently, except where files go
    and the fields in ``vary`` (what the cells differ in by design). A field one config predates counts
    with its default."""
    fa, fb, vary = _filled(a), _filled(b), tuple(vary)
    return [(k, fa[k], fb[k]) for k in sorted(fa.keys() & fb.keys()) if fa[k] != fb[k] and not _ignored(k, vary)]


def cell_keys(overrides: Iterable[str]) -> set[str]:
    """The config fields a cell's overrides set."""
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _fields(diff: Sequence[tuple[str, Any, Any]], left: str, right: str) -> str:
    return "; ".join(f"{k}: {left} {a!r}, {right} {b!r}" for k, a, b in diff[:6]) + (" ..." if len(diff) > 6 else "")


def check_done_cells(done: Sequence[tuple[str, Path, Mapping[str, Any]]]) -> None:
    """``done``: (cell name, its finished run dir, the config it would run with now). A finished cell made
    under another config is not a result of this sweep: refuse before any cell runs, naming the fields."""
    bad = []
    for name, run_dir, now in done:
        if (run_dir / "config.yaml").is_file():
            diff = protocol_differences(_load(run_dir / "config.yaml"), now)
            if diff:
                bad.append(f"{name} ({_fields(diff, 'finished with', 'now')})")
    if bad:
        raise UserError(
            f"{len(bad)} finished cell(s) under {done[0][1].parent} were run with another config and would be counted "
            f"as results of this one: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}. Move the old runs to their "
            "own folder (e.g. git mv DIR/runs DIR/runs_v1), or pass another --out"
        )


def check_one_protocol(runs: Sequence[Mapping[str, Any]]) -> None:
    """``runs``: the collector's run infos (``name``, ``config``, ``vary``: the fields its cell sets). All
    must share one protocol, else the table would average two experiments into one row."""
    if len(runs) < 2:
        return
    vary = set().union(*(r["vary"] for r in runs))
    first = runs[0]
    for r in runs[1:]:
        diff = protocol_differences(first["config"], r["config"], vary)
        if diff:
            raise UserError(
                f"the runs mix protocols: {first['name']} and {r['name']} differ in "
                f"{_fields(diff, first['name'], r['name'])}. Collect each protocol's runs from its own folder (the "
                "staleness study keeps its protocol-v1 cells in docs/staleness_study/runs_v1)"
            )

"""Sweep cells: the grid file format (examples/study/grid.yaml), selection, validation against the base
config, completion markers and per-cell checkpoint directories."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from minpro_megatron.atomic_io import atomic_write_text
from minpro_megatron.config import ConfigError, load_config

@dataclass(frozen=True)
class Cell:
    """One grid point: its run name, the overrides that make it, and the labels the collector groups by
    (``group`` / ``method`` from a grid file; empty for a --methods/--staleness/--seeds sweep, where the
    collector derives the method from the run's config)."""

    name: str
    overrides: tuple[str, ...]
    group: str = ""
    method: str = ""


DONE_MARKER = "cell_done.json"
FAILED_MARKER = "cell_failed.json"
CELL_FILE = "cell.json"


def load_grid(path: str | Path) -> list[Cell]:
    """Cells of a grid file (examples/study/grid.yaml documents the format):

        seeds: [1, 2, 3]
        methods: {grpo: [loss.name=grpo, loss.dual_clip=3.0], minpro: [loss.name=minpro]}
        groups:
          - {name: core, methods: [grpo, minpro], staleness: [0, 2], overrides: []}
        order: seed-major     # all groups of seed 1 first (default), or group-major

    Cell names are GROUP-METHOD-nN-sSEED. Within a seed, groups, methods and staleness keep file order."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"sweep grid {str(path)!r}: cannot read it ({exc})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep grid {path}: expected a mapping with seeds, methods and groups")
    unknown = set(spec) - {"seeds", "methods", "groups", "order"}
    if unknown:
        raise ConfigError(f"sweep grid {path}: unknown key(s) {sorted(unknown)}; allowed: seeds, methods, groups, order")
    seeds, methods, groups = spec.get("seeds"), spec.get("methods"), spec.get("groups")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        raise ConfigError(f"sweep grid {path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"sweep grid {path}: 'methods' must map a method name to its list of overrides")
    for m, ovr in methods.items():
        if not isinstance(ovr, list) or not all(isinstance(o, str) and "=" in o for o in ovr):
            raise ConfigError(f"sweep grid {path}: methods.{m} must be a list of 'key=value' overrides, got {ovr!r}")
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"sweep grid {path}: 'groups' must be a non-empty list")
    order = spec.get("order", "seed-major")
    if order not in ("seed-major", "group-major"):
        raise ConfigError(f"sweep grid {path}: order={order!r}; use seed-major or group-major")
    per_group: list[list[tuple[str, str, int, tuple[str, ...]]]] = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.]+", g["name"]):
            raise ConfigError(f"sweep grid {path}: groups[{i}] needs a 'name' of letters, digits, '_' or '.'")
        bad = set(g) - {"name", "methods", "staleness", "overrides"}
        if bad:
            raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}): unknown key(s) {sorted(bad)}")
        for m in g.get("methods") or []:
            if m not in methods:
                raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}) uses method {m!r}, not defined under 'methods'")
        ns = g.get("staleness")
        if not g.get("methods") or not isinstance(ns, list) or not ns or not all(isinstance(n, int) and n >= 0 for n in ns):
            raise ConfigError(f"sweep grid {path}: groups[{i}] ({g['name']}) needs 'methods' and 'staleness' (integers >= 0)")
        extra = tuple(g.get("overrides") or [])
        per_group.append([(g["name"], m, n, extra) for m in g["methods"] for n in ns])
    keyed = [(seed, gi, j, cell) for gi, cells in enumerate(per_group) for j, cell in enumerate(cells) for seed in seeds]
    keyed.sort(key=(lambda k: (seeds.index(k[0]), k[1], k[2])) if order == "seed-major"
               else (lambda k: (k[1], seeds.index(k[0]), k[2])))
    out, names = [], set()
    for seed, _, _, (group, method, n, extra) in keyed:
        name = f"{group}-{method}-n{n}-s{seed}"
        if name in names:
            raise ConfigError(f"sweep grid {path}: cell {name} appears twice")
        names.add(name)
        ovr = (*methods[method], *extra, f"rollout.staleness.n={n}", f"train.seed={seed}")
        out.append(Cell(re.sub(r"[^A-Za-z0-9_.=-]", "_", name), ovr, group, method))
    return out


def select_cells(cells: Sequence[Cell], only: str) -> list[Cell]:
    """The cells matching any of the comma-separated names / fnmatch patterns, in grid order."""
    import fnmatch

    pats = [p for p in only.split(",") if p]
    for pat in pats:
        if not any(fnmatch.fnmatchcase(c.name, pat) for c in cells):
            raise ConfigError(f"--only: {pat!r} matches no cell of the grid (e.g. {cells[0].name})")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


def validate_cells(config: str, overrides: Sequence[str], cells: Sequence[Cell]) -> None:
    """Every cell's config must load and validate (as the single local process that runs it) before the
    first run starts; errors name the cell."""
    for c in cells:
        try:
            load_config(config, [*overrides, *c.overrides]).validate(world_size=1)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {c.name} ({' '.join(c.overrides)}): {exc}") from None


def write_json_atomic(path: Path, data: dict) -> None:
    """A marker is either absent or complete, never half-written."""
    atomic_write_text(path, json.dumps(data, indent=1))


def is_done(run_dir: Path) -> bool:
    """The cell's completion marker exists; a run directory of an older sweep (no cell.json, finished when
    it wrote summary.md) also counts, so upgrading never deletes finished runs."""
    if (run_dir / DONE_MARKER).is_file():
        return True
    return not (run_dir / CELL_FILE).exists() and (run_dir / "summary.md").is_file()


def cell_checkpoint_dir(config: str, overrides: Sequence[str], cell: Cell, checkpoint_root: Path | None) -> Path | None:
    """Each cell's own checkpoint directory: CHECKPOINT_ROOT/<cell>, else <base checkpoint.dir>/<cell> when the
    base config sets one (a shared directory would make cells resume from and prune each other's
    checkpoints), else None (the trainer's default, <run dir>/checkpoints, is already per cell)."""
    if checkpoint_root is not None:
        return checkpoint_root / cell.name
    base = load_config(config, list(overrides)).checkpoint.dir
    return Path(base) / cell.name if base else None


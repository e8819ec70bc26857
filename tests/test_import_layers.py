"""The package layers of docs/architecture.md, enforced: every import (module level, inside functions,
under TYPE_CHECKING) goes to the same layer or a lower one, and the packages of one layer import each
other without cycles. ``import minpro_megatron.config`` loads no torch (login nodes load configs)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "minpro_megatron"

# Bottom to top; a name is a subpackage or a top-level module of minpro_megatron. Keep in step with
# docs/architecture.md.
LAYERS: list[list[str]] = [
    ["atomic_io", "config", "cli_support", "checkpoint_tracker"],
    ["parallel"],
    ["losses", "advantages", "rewards", "data", "models", "metrics", "preflight"],
    ["learner"],
    ["convert"],
    ["serving"],
    ["weights"],
    ["rollout"],
    ["train"],
    ["eval", "slurm", "sweep", "gpucheck", "cli"],
]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the importing modules, for imports between different units
    (a unit is the first component below ``root``'s package)."""
    top, units = root.name, _units(root)
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.split(".")
                if parts[0] != top or len(parts) < 2 or len(module.split(".")) < 2:
                    continue
                src, dst = module.split(".")[1], parts[1]
                if src != dst and dst in units:
                    edges[(src, dst)].append(module)
    return edges


def _units(root: Path) -> set[str]:
    return {p.stem if p.is_file() else p.name for p in root.iterdir()
            if (p.is_file() and p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}


def layer_violations(root: Path, layers: list[list[str]]) -> list[str]:
    """Human-readable violations: unknown units, upward imports, cycles within a layer."""
    level = {unit: i for i, names in enumerate(layers) for unit in names}
    problems = [f"{u}: not in any layer (add it to LAYERS and docs/architecture.md)"
                for u in sorted(_units(root) - set(level))]
    edges = package_imports(root)
    for (src, dst), modules in sorted(edges.items()):
        if src in level and dst in level and level[dst] > level[src]:
            problems.append(f"upward import {src} (layer {level[src]}) -> {dst} (layer {level[dst]}) in {sorted(set(modules))}")
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
    for cycle in _cycles(graph):
        problems.append("cycle: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component with more than one unit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph has ~25 nodes: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_upward_imports_and_no_cycles() -> None:
    assert layer_violations(ROOT, LAYERS) == []


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "minpro_megatron"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (root / "__init__.py").touch()
    return root


def test_the_checker_finds_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from minpro_megatron.high.b import g\n",
        "high/__init__.py": "",
        "high/b.py": "from minpro_megatron.low import a\n",
    })
    problems = layer_violations(root, [["low"], ["high"]])
    assert any(p.startswith("upward import low (layer 0) -> high (layer 1)") for p in problems), problems
    assert any(p.startswith("cycle: high -> low") for p in problems), problems


def test_the_checker_finds_a_cycle_within_one_layer_through_relative_imports(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {
        "a/__init__.py": "from ..b import x\n",
        "b/__init__.py": "x = 1\nfrom minpro_megatron.c import y\n",
        "c.py": "from minpro_megatron import a\ny = 2\n",
    })
    problems = layer_violations(root, [["a", "b", "c"]])
    assert problems == ["cycle: a -> b -> c -> a"], problems
    assert layer_violations(root, [["c"], ["b"], ["a"]])[0].startswith("upward import c (layer 0) -> a (layer 2)")


def test_a_unit_missing_from_the_layers_is_reported(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {"newpkg/__init__.py": "", "old.py": ""})
    assert layer_violations(root, [["old"]]) == ["newpkg: not in any layer (add it to LAYERS and docs/architecture.md)"]


@pytest.mark.parametrize("module", ["minpro_megatron.config", "minpro_megatron.slurm.submit"])
def test_loading_configs_and_submitting_imports_no_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'megatron', 'sglang') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"

"""The import graph keeps its layers: no cycle, the composition root imported from above
only, each layer blind to the ones above it, and the registries cheap to load."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("daemon", "api")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, top_level_only: bool) -> Iterator[str]:
    """The modules ``module`` imports (inside functions too, unless ``top_level_only``), not
    those under ``if TYPE_CHECKING:``, which never run."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                continue
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, *([child.module] if child.module else [])])
                yield base
                yield from (f"{base}.{alias.name}" for alias in child.names)
            yield from visit(child)

    yield from visit(ast.parse(path.read_text(), str(path)))


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {m: {t for t in _imported(m, p, top_level_only) if t in MODULES and t != m} for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Groups of modules that import each other, through any path (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in graph:
        if v not in index:
            strong(v)
    return found


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# Who may not import whom: each layer is blind to the layers above it.
ABOVE = {
    "daemon.config": ("daemon.run", "daemon.plugin", "daemon.engine", "daemon.tasks", "daemon.sync", "daemon.data",
                      "daemon.upload", "api"),
    "daemon.engine": ("daemon.run", "daemon.plugin", "daemon.tasks", "daemon.sync", "daemon.data", "api"),
    "daemon.plugin": ("daemon.run", "daemon.tasks", "daemon.sync", "daemon.data", "api"),
    "daemon.data": ("daemon.run", "daemon.tasks", "daemon.sync", "api"),
    "daemon.sync": ("daemon.run", "daemon.tasks", "daemon.data", "api"),
    "daemon.tasks": ("daemon.run", "daemon.sync", "api"),
    "daemon.upload": ("daemon.run", "daemon.plugin", "daemon.engine", "daemon.tasks", "daemon.sync", "daemon.data"),
    "api": ("daemon.run", "daemon.plugin", "daemon.engine", "daemon.tasks", "daemon.sync", "daemon.data"),
}


class TestImportGraph:
    """Modules of daemon/ and api/, every import counted (inside functions too)."""

    def test_no_cycle(self) -> None:
        assert _cycles(_graph()) == []

    def test_the_composition_root_is_imported_from_above_only(self) -> None:
        below = sorted(f"{m} -> {t}" for m, targets in _graph().items() for t in targets
                       if _in(t, "daemon.run") and not _in(m, "daemon.run", "daemon.cli"))
        assert below == []

    @pytest.mark.parametrize("layer", sorted(ABOVE))
    def test_a_layer_does_not_import_the_ones_above(self, layer: str) -> None:
        upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() if _in(m, layer)
                        for t in targets if _in(t, *ABOVE[layer]))
        assert upward == []

    def test_the_tasks_do_not_import_each_other(self) -> None:
        tasks = {m.split(".")[2] for m in MODULES if m.startswith("daemon.tasks.")}
        crossing = sorted(f"{m} -> {t}" for m, targets in _graph().items() if m.startswith("daemon.tasks.")
                          for t in targets if t.startswith("daemon.tasks.") and t.split(".")[2] != m.split(".")[2])
        assert len(tasks) >= 2 and crossing == []

    def test_the_cli_finds_the_configs_parts_without_a_model_library(self) -> None:
        """`minerd config validate` loads the catalog: what it imports when loaded (not inside
        builders) includes no torch, transformers or numpy."""
        graph = _graph(top_level_only=True)
        seen, todo = set(), ["daemon.run.catalog", "daemon.cli"]
        heavy: set[str] = set()
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            for name in _imported(module, MODULES[module], top_level_only=True):
                if name.split(".")[0] in ("torch", "transformers", "numpy", "faiss", "tokenizers"):
                    heavy.add(f"{module} -> {name}")
            todo.extend(graph[module])
            # Importing a module runs its packages' __init__ first.
            todo.extend(p for p in (module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1))
                        if p in MODULES)
        assert heavy == set() and "daemon.run.catalog" in seen

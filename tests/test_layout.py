"""The package's shape: stages in their own folders, imports that only point down the pipeline, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
MAX_LINES = 420  # "no module over ~400 lines"; the test fakes are test support, not the product


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every relay module ``path`` imports, at any level (function-level imports hide cycles otherwise)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relay"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_import_graph_has_no_cycle() -> None:
    """No two modules import each other, directly or round about, even through function-level imports."""
    assert _cycles(import_graph()) == []


def test_cycle_check_finds_a_planted_cycle() -> None:
    """The check itself: a graph with a loop is reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reaches(graph: dict[str, set[str]], source_prefix: str, target_prefix: str) -> list[tuple[str, str]]:
    return sorted((src, dst) for src, dsts in graph.items() if src.startswith(source_prefix)
                  for dst in dsts if dst.startswith(target_prefix))


def test_imports_point_down_the_pipeline() -> None:
    """http never reaches for runtime, providers never for delivery, stores never for the registry file parser,
    inbound never for delivery, and logging never pulls in systemd."""
    graph = import_graph()
    assert _reaches(graph, "relay.http", "relay.runtime") == []
    assert _reaches(graph, "relay.providers", "relay.delivery") == []
    assert _reaches(graph, "relay.store", "relay.registry.file") == []
    assert _reaches(graph, "relay.store", "relay.registry.routing") == []
    assert _reaches(graph, "relay.inbound", "relay.delivery") == []
    assert _reaches(graph, "relay.observability", "relay.runtime") == []
    assert _reaches(graph, "relay.delivery", "relay.http") == []


def test_each_stage_has_its_own_folder() -> None:
    """A newcomer finds each stage of the pipeline under its own name."""
    for stage in ("config", "inbound", "registry", "store", "delivery", "providers", "http", "runtime"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_no_product_module_is_over_the_size_limit() -> None:
    """Modules stay small enough to read in one sitting (test fakes under relay/testing aside)."""
    big = {name: len(path.read_text().splitlines()) for name, path in _modules().items()
           if not name.startswith("relay.testing")}
    assert {name: n for name, n in big.items() if n > MAX_LINES} == {}

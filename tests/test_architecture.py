"""The house's rules, measured: imports only point down (no cycles, type-only imports included), the pure
routing core does no I/O, and no module or function grows past what a newcomer can read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "paddler_sync"
PURE_CORE = ("paddler_sync.endings", "paddler_sync.counters", "paddler_sync.fleet.store",
             "paddler_sync.fleet.upstream", "paddler_sync.fleet.policy", "paddler_sync.fleet.ledger",
             "paddler_sync.fleet.speed", "paddler_sync.traffic", "paddler_sync.tenants.rule",
             "paddler_sync.tenants.book", "paddler_sync.tenants.rates")
IO_MODULES = ("gevent", "greenlet", "redis", "requests", "urllib3", "socket", "flask", "gunicorn", "select",
              "threading", "subprocess", "http", "paddler_sync.fleet.redis_store", "paddler_sync.proxy",
              "paddler_sync.management", "paddler_sync.balancer")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module this one imports, anywhere in it (functions and ``if TYPE_CHECKING:`` blocks too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 steps
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def internal_graph() -> dict[str, set[str]]:
    return {name: {i for i in imports_of(name) if i in MODULES and i != name and not name.startswith(i + ".")
                   and i != "paddler_sync"} for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_type_only_imports_included() -> None:
    assert cycles(internal_graph()) == []


def test_the_pure_core_does_no_io() -> None:
    for name in PURE_CORE:
        assert name in MODULES, name
        bad = {i for i in imports_of(name) if any(i == io or i.startswith(io + ".") for io in IO_MODULES)}
        assert not bad, f"{name} imports {bad}"


def test_no_module_is_too_long_to_read() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_too_long_to_read() -> None:
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = lines
    assert long == {}


def test_the_graph_check_sees_cycles() -> None:
    """The checker itself: a made-up cycle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

"""The house's rules, measured: imports only point down (no cycles, type-only imports included), the pure
routing core does no I/O, and no module or function grows past what a newcomer can read in one sitting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "paddler_sync"
PURE_CORE = ("paddler_sync.endings", "paddler_sync.counters", "paddler_sync.ledger.stores.base",
             "paddler_sync.ledger.stores.local", "paddler_sync.ledger.slots", "paddler_sync.ledger.policy",
             "paddler_sync.ledger.ledger", "paddler_sync.ledger.refusals", "paddler_sync.routing.speed",
             "paddler_sync.routing.prefixes", "paddler_sync.traffic", "paddler_sync.tenants.rule",
             "paddler_sync.tenants.book", "paddler_sync.tenants.rates", "paddler_sync.protocol.models",
             "paddler_sync.protocol.states")
IO_MODULES = ("gevent", "greenlet", "redis", "requests", "urllib3", "socket", "flask", "gunicorn", "select",
              "threading", "subprocess", "http", "paddler_sync.ledger.stores.redis", "paddler_sync.proxy",
              "paddler_sync.management", "paddler_sync.balancer")
# The packages of the balancer's core, lowest first: each imports only from the ones before it (and from the
# top-level helpers: errors, endings, addresses, ...). Everything that serves (proxy, management, balancer,
# server) sits above them all; the agent and the simulator speak only the protocol.
LAYERS = ("paddler_sync.protocol", "paddler_sync.tenants", "paddler_sync.ledger", "paddler_sync.routing",
          "paddler_sync.fleet")
SERVING = ("paddler_sync.proxy", "paddler_sync.management", "paddler_sync.balancer", "paddler_sync.server",
           "paddler_sync.agent", "paddler_sync.simulator")
# inside the ledger: the stores below the ledger and the buffer
LEDGER_LAYERS = ("paddler_sync.ledger.refusals", "paddler_sync.ledger.slots", "paddler_sync.ledger.stores",
                 "paddler_sync.ledger.policy", "paddler_sync.ledger.ledger", "paddler_sync.ledger.buffer")
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


def layer_of(module: str, layers: tuple[str, ...]) -> int | None:
    return next((i for i, top in enumerate(layers) if module == top or module.startswith(top + ".")), None)


def upward_imports(layers: tuple[str, ...]) -> list[str]:
    """Imports from a module of one layer into a higher one (or into the serving packages)."""
    found = []
    for name, imported in internal_graph().items():
        mine = layer_of(name, layers)
        if mine is None:
            continue
        for other in imported:
            theirs = layer_of(other, layers)
            if (theirs is not None and theirs > mine) or any(other.startswith(s) for s in SERVING):
                found.append(f"{name} -> {other}")
    return sorted(found)


def test_the_core_packages_point_down_only() -> None:
    assert all(any(m == top or m.startswith(top + ".") for m in MODULES) for top in LAYERS + LEDGER_LAYERS)
    assert upward_imports(LAYERS) == []
    assert upward_imports(LEDGER_LAYERS) == []


def test_the_agent_and_the_simulator_speak_only_the_protocol() -> None:
    core = ("paddler_sync.tenants", "paddler_sync.ledger", "paddler_sync.routing", "paddler_sync.fleet",
            "paddler_sync.proxy", "paddler_sync.management", "paddler_sync.balancer")
    leaks = sorted(f"{name} -> {other}" for name, imported in internal_graph().items()
                   if name.startswith(("paddler_sync.agent", "paddler_sync.simulator"))
                   for other in imported if other.startswith(core))
    assert leaks == []


def test_the_graph_check_sees_cycles() -> None:
    """The checker itself: a made-up cycle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


UNIT_ROOM = ROOT / "tests" / "unit"
NOT_IN_THE_UNIT_ROOM = ("subprocess", "import socket", "run_cli", "Fleet", "redis_server", "redis_cluster",
                        "time.sleep", "free_port", "Popen", "llamacpp_models", "playwright")


def test_the_unit_room_starts_no_process_opens_no_socket_and_never_sleeps() -> None:
    """tests/unit/ runs in seconds (make test-unit) because it waits for nothing: what starts processes lives in
    tests/live/, tests/real/ or tests/browser/."""
    found = {}
    for path in sorted(UNIT_ROOM.glob("test_*.py")):
        if path.name == "test_architecture.py":
            continue  # it reads source files, and names what it looks for
        text = path.read_text()
        bad = [word for word in NOT_IN_THE_UNIT_ROOM if word in text]
        bad += [m.group(0) for m in re.finditer(r"\brequests\.(get|post|put|delete|request|Session)\(", text)]
        bad += [m.group(0) for m in re.finditer(r"gevent\.sleep\((?!0\))[^)]*\)", text)]
        if bad:
            found[path.name] = bad
    assert found == {}

"""Architecture checks: no import circle between our modules, and each service process
imports only what it needs (docs/design.md §4; README "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere (top level, in functions, under
    TYPE_CHECKING: a circle is a design problem wherever its edges are)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` imports the submodule.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of shared/ and services/ it imports."""
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_there_is_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and graph["services.ingest.app"]  # the walk found the code
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_the_simulator_uses_the_policy_package_not_the_scheduler_service() -> None:
    graph = import_graph()
    simulator = [m for m in graph if m.startswith("services.simulator")]
    assert simulator
    for module in simulator:
        assert not {m for m in graph[module] if m.startswith("services.scheduler")}, module
    assert "shared.policy.config" in graph["services.simulator.engine"]


def test_shared_imports_no_service() -> None:
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("shared"):
            assert not {m for m in imported if m.startswith("services")}, module


def _loaded_modules(statement: str) -> set[str]:
    """Top-level packages in ``sys.modules`` of a fresh interpreter after ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return {line.split(".")[0] for line in out.split()}


@pytest.mark.parametrize(("statement", "forbidden"), [
    # The ingest tokenizes and talks to Redis: no torch.
    ("import services.ingest.app", {"torch"}),
    # The scheduler evaluates fitted cost models: no torch, and not the fit's libraries.
    ("import services.scheduler.service", {"torch", "sklearn", "scipy", "transformers"}),
    # The policy package is pure (numpy): no Redis, no RQ either.
    ("import shared.policy.planning, shared.policy.config, shared.policy.costmodel",
     {"torch", "sklearn", "scipy", "redis", "rq", "transformers"}),
    # The simulator runs the policies without the scheduler service or any model.
    ("import services.simulator.engine", {"torch", "sklearn", "scipy", "rq", "transformers"}),
    # Every `scls ...` call loads the CLI: model libraries only when a command needs them
    # (a 7 s torch import made `scls status` miss a snapshot in tests/test_status.py).
    ("import services.cli", {"torch", "transformers"}),
])
def test_processes_import_only_what_they_need(statement: str, forbidden: set[str]) -> None:
    assert not _loaded_modules(statement) & forbidden


def test_the_import_check_sees_a_heavy_import() -> None:
    assert "sklearn" in _loaded_modules("import services.worker.fit")


def test_services_reach_redis_only_through_the_store() -> None:
    """No service reaches through ``Store.r`` or opens its own asyncio client: Redis is
    reached through shared/core (Store, AsyncStore, EventWaiter); RQ keeps its connection."""
    offenders = []
    for path in sorted((REPO / "services").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "r"):
                offenders.append(f"{path.name}:{node.lineno} .r.{node.attr}")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.startswith("redis.asyncio") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports redis.asyncio")
    assert offenders == []

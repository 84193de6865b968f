"""The house's layers point down: import contracts, no import cycle, modules under 400 lines.

The cycle test reads the source itself (every import counts: inside functions and under
TYPE_CHECKING too, since either one hides a circle that a refactor later closes).
"""

from __future__ import annotations

import ast
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sagaq"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "migrations" not in p.relative_to(PACKAGE).parts}


def import_graph() -> dict[str, set[str]]:
    """Module → the sagaq modules it imports, anywhere in its body.

    ``from sagaq.x import y`` is an import of ``sagaq.x.y`` when that is a module, else of
    ``sagaq.x``; a relative import is resolved against the importing module's package.
    """
    sources = _sources()
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in sources else base)
            for target in targets:
                # `import sagaq.a.b` names the deepest module that exists
                while target and target not in sources:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group (a DFS), each as a closed path a → … → a."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    seen_groups: list[set[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                members = set(cycle)
                if not any(members <= group for group in seen_groups):
                    seen_groups.append(members)
                    found.append(cycle)
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_find_cycles_finds_one() -> None:
    """The detector itself: a circle through a function-local import is one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_resolves_submodules_and_local_imports() -> None:
    graph = import_graph()
    # `from sagaq.store.faults import Write` is an import of the submodule, not the package
    assert "sagaq.store.faults" in graph["sagaq.runtime"]
    # definition reaches the runtime through a hook, never an import (not even a local one)
    assert not {m for m in graph["sagaq.definition"] if m.startswith("sagaq.runtime")}


def test_no_import_cycle_inside_sagaq() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles inside sagaq/:\n" + "\n".join(
        " → ".join(c) for c in cycles
    )


def test_modules_stay_under_the_line_limit() -> None:
    over = {
        str(p.relative_to(ROOT)): n
        for p in _sources().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): " + ", ".join(
        f"{path} ({n})" for path, n in sorted(over.items(), key=lambda kv: -kv[1])
    )


def test_import_contracts_hold() -> None:
    """The [tool.importlinter] contracts in pyproject.toml; a broken one is shown as
    lint-imports reports it."""
    pytest.importorskip("importlinter")
    import importlinter.api  # noqa: F401  (configures the adapters lint_imports uses)
    from importlinter.application.use_cases import lint_imports

    out = io.StringIO()
    with redirect_stdout(out):
        passed = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_logo=True,
                              cache_dir=None)
    assert passed, out.getvalue()


def test_saga_enqueue_goes_through_the_hook_the_runtime_installs() -> None:
    """definition never imports the runtime: importing sagaq installs the hook, and without
    one Saga.enqueue says what is missing instead of failing on an import."""
    import sagaq
    from sagaq import definition, runtime
    from sagaq.definition import Registry, Saga

    assert definition._enqueue is runtime._enqueue  # `import sagaq` installed it
    saga = Saga("hooked", registry=Registry())

    @saga.step(side_effect=False)
    def look(ctx: object, inp: object) -> None: ...

    calls: list[tuple[object, ...]] = []

    def record(s: Saga, input: object, *, key: str | None, session: object) -> str:
        calls.append((s, input, key, session))
        return "saga-id"

    try:
        definition.use_enqueue(None)
        with pytest.raises(sagaq.ConfigurationError, match="import sagaq"):
            saga.enqueue({"a": 1})
        definition.use_enqueue(record)
        assert saga.enqueue({"a": 1}, key="k") == "saga-id"
        assert calls == [(saga, {"a": 1}, "k", None)]
    finally:
        definition.use_enqueue(runtime._enqueue)

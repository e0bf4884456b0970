"""The shape of the code itself: no import cycle among kvtier's modules, no long function.

The import graph has an edge A -> B for every `import B` / `from B import ...` in module A that
runs when A (or one of its functions) runs: module level and function level alike. A deferred
import inside a function is still a dependency — it is how the command line and the benchmarks
once imported each other (kvtier.cli <-> kvtier.benchmarks.cli) with no cycle at module level —
so it counts. Only imports under `if TYPE_CHECKING:` are left out: they never run and exist for
annotations, the one place a type may point back up.

Edges go to the module named, not to the packages above it: `from kvtier.cache.storage import X`
is an edge to kvtier.cache.storage alone, and `from kvtier.cache import storage` (a submodule) an
edge to kvtier.cache.storage. Otherwise every module would reach kvtier/__init__.py, which
re-exports LLM, and everything would be one cycle through the package.

Functions (and methods) are measured from the `def` line to their last line, decorators and
docstring included; the acceptance of issue 11 caps them at 60 lines inside kvtier/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvtier"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth, skipping `if TYPE_CHECKING:` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else ast.iter_child_nodes(node)
        stack.extend(children)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    submodules = {f"{name}.{alias.name}" for alias in node.names} & modules
    return submodules or ({name} & modules)


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    for module, (path, tree) in sources.items():
        is_package = path.name == "__init__.py"
        edges = set().union(*(_targets(n, module, is_package, modules) for n in _imports(tree)))
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; iterative DFS with white/grey/black colouring."""
    colour = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        colour[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path, tree in _sources().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_import_cycle_in_kvtier():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_edges():
    """The cycle this test was written for ran through imports inside functions."""
    graph = import_graph()
    assert "kvtier.benchmarks.cli" in graph["kvtier.cli"]  # `from kvtier.benchmarks.cli import ...` in a function
    assert "kvtier.cli" not in graph["kvtier.benchmarks.cli"]


def test_no_function_in_kvtier_over_60_lines():
    assert long_functions() == []


def test_the_engine_and_server_never_import_matplotlib():
    """matplotlib is the `bench` extra: importing kvtier, building the CLI or the server must not need it."""
    code = ("import sys; import kvtier, kvtier.cli, kvtier.server, kvtier.benchmarks.serve, "
            "kvtier.benchmarks.multiturn; kvtier.cli.build_parser(); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_plot_without_matplotlib_is_refused_before_the_benchmark(monkeypatch):
    from kvtier.benchmarks.multiturn import MultiturnConfig
    from kvtier.benchmarks.serve import ServeBenchConfig
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ValueError, match=r"--plot: .*install kvtier\[bench\]"):
        MultiturnConfig(plot="out.png")
    with pytest.raises(ValueError, match=r"--plot-file: .*install kvtier\[bench\]"):
        ServeBenchConfig(plot_file="out.png")

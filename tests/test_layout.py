"""The package's layers run one way: commands -> config -> libraries -> errors, no circles.

Imports are read from the source (module level and inside functions alike), so
a lazy import that runs back up a layer counts as much as a top-level one.
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "pipeline"
COMMANDS = {
    "pipeline.train",
    "pipeline.evaluate",
    "pipeline.export",
    "pipeline.predict",
    "pipeline.bench",
    "pipeline.doctor",
    "pipeline.data.scan",
    "pipeline.data.inspect",
    "pipeline.data.service",
}
CONFIG_LAYER = "pipeline.config"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.x import y` imports the submodule pipeline.x.y where there is one
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import pipeline.models.layers` -> that module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(_module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``pipeline`` itself left out)."""
    modules = _modules()
    return {m: _imports(p, modules) - {"pipeline"} for m, p in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_commands_exist():
    missing = COMMANDS - set(_modules())
    assert not missing, missing


def test_no_import_circle():
    assert import_circles(import_graph()) == []


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]]


def test_no_library_imports_a_command():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module not in COMMANDS
        for target in sorted(targets & COMMANDS)
    ]
    assert upward == []


def test_only_commands_use_the_config_layer():
    users = {m for m, targets in import_graph().items() if CONFIG_LAYER in targets}
    assert users <= COMMANDS, users - COMMANDS


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: _module_name(p))
def test_functions_are_short(path):
    """None over 80 lines; over 60 only with a docstring that says why."""
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if lines > MAX_FUNCTION_LINES or (lines > 60 and "long" not in doc.lower()):
                long.append(f"{node.name}: {lines} lines")
    assert long == []

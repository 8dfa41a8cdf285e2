"""The package's imports: no circle, and no module takes another's private names.

A circle has to be broken by a lazy import and makes the import order matter; a private
name used from another module is a contract nobody wrote down. Both are read from the
source with ``ast``: every ``import`` and ``from ... import`` of a ``bridge`` module in
``bridge/``, at module level or inside a function."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bridge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(module named, the name taken from it or ``None``, line) for each import in
    ``module``; a relative import is resolved to the absolute name."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                yield source, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (``from bridge.admin
    import cli`` imports ``bridge.admin.cli``)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        for source, name, _ in _imports(module):
            submodule = f"{source}.{name}"
            target = submodule if submodule in MODULES else source
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_the_graph_holds_imports_made_inside_functions():
    graph = _graph()
    assert "bridge.wiring" in graph["bridge.cli"]  # inside check_command
    assert "bridge.admin.cli" in graph["bridge.cli"]  # from bridge.admin import cli


def test_no_module_imports_itself_through_others():
    graph = _graph()
    reach = {module: _reachable(graph, module) for module in graph}
    circles = sorted(
        {
            tuple(sorted({module} | {other for other in reach[module] if module in reach[other]}))
            for module in graph
            if module in reach[module]
        }
    )
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_module_takes_a_private_name_from_another():
    borrowed = [
        f"{module}:{line} takes {name} from {source}"
        for module in MODULES
        for source, name, line in _imports(module)
        if source in MODULES
        and source != module
        and name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and f"{source}.{name}" not in MODULES
    ]
    assert borrowed == []

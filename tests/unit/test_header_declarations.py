"""A request keeps only the headers some stage declared it reads (``declare_read``, or a
dialect's ``reads``), so a stage reading a header it did not declare would read ``None``
as soon as no other stage happens to declare it. These tests find such a read: in the
source, for every header name written out, and by running each dialect."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.pipeline import dialects
from bridge.pipeline.dialects import NAVIGATION_HEADERS, Dialect, Dialects
from bridge.web.request import HeaderView, OriginalRequest, declared
from bridge.web.responses import Refusal

PACKAGE = Path(dialects.__file__).parents[1]
VIEWS = ("HeaderView", "HeaderSource")  # what a stage's headers parameter is annotated as


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _view_parameters(function: ast.FunctionDef) -> set[str]:
    arguments = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
    return {
        argument.arg
        for argument in arguments
        if argument.annotation is not None
        and ast.unparse(argument.annotation).strip("'\"") in VIEWS
    }


def _named_reads(function: ast.FunctionDef) -> list[tuple[str, int]]:
    """Header names written out where ``function`` reads its request's headers:
    ``headers.get("x")``, ``headers.get_all("x")`` and a helper's ``f(headers, "x")``."""
    views = _view_parameters(function)
    found = []
    for call in ast.walk(function):
        if not isinstance(call, ast.Call):
            continue
        callee, arguments = call.func, call.args
        if (
            isinstance(callee, ast.Attribute)
            and callee.attr in ("get", "get_all")
            and isinstance(callee.value, ast.Name)
            and callee.value.id in views
        ):
            names = arguments[:1]
        elif any(isinstance(a, ast.Name) and a.id in views for a in arguments[:1]):
            names = arguments[1:2]
        else:
            continue
        found += [(n.value, n.lineno) for n in names if isinstance(n, ast.Constant)]
    return found


def _declared_in(tree: ast.Module) -> set[str]:
    """The names a module passes to ``declare_read``."""
    return {
        argument.value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "declare_read"
        for argument in call.args
        if isinstance(argument, ast.Constant)
    }


def _reads_by_scope() -> list[tuple[str, str | None, str, int]]:
    """(module, class or None, header name, line) for every header name read in bridge/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        functions: list[tuple[str | None, ast.FunctionDef]] = []
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef):
                functions.append((None, node))
            elif isinstance(node, ast.ClassDef):
                functions += [(node.name, f) for f in node.body if isinstance(f, ast.FunctionDef)]
        for class_name, function in functions:
            found += [
                (_module(path), class_name, name, line) for name, line in _named_reads(function)
            ]
    return found


def _declaration(module: str, class_name: str | None) -> set[str]:
    """What a read in this scope may name: a dialect's own ``reads``; elsewhere, what its
    module passes to ``declare_read``."""
    if class_name is not None:
        owner = getattr(importlib.import_module(module), class_name)
        if isinstance(owner, type) and issubclass(owner, Dialect):
            return set(owner.reads)
    path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    return _declared_in(ast.parse(path.read_text()))


def test_every_header_named_in_a_read_is_declared_where_it_is_read():
    undeclared = [
        f"{module}:{line} {class_name or 'module'} reads {name!r}"
        for module, class_name, name, line in _reads_by_scope()
        if name not in _declaration(module, class_name)
    ]
    assert undeclared == []


def test_the_scan_finds_the_reads_of_every_module_that_declares():
    """Guards the test above against passing because it found nothing to check."""
    reading = {module for module, _, _, _ in _reads_by_scope()}
    declaring = {
        _module(path)
        for path in PACKAGE.rglob("*.py")
        if _declared_in(ast.parse(path.read_text())) and path.stem != "request"
    }
    assert declaring
    assert declaring <= reading


class RecordingView(HeaderView):
    """A ``HeaderView`` that remembers every name it is asked for."""

    __slots__ = ("asked",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self.asked: set[str] = set()

    def get(self, name: str) -> str | None:
        self.asked.add(name)
        return super().get(name)

    def get_all(self, name: str) -> list[str]:
        self.asked.add(name)
        return super().get_all(name)


# A browser's request to https://app.example.test/reports?q=1, as each dialect's proxy
# sends it: every header any dialect names, so only the dialect's own reads decide.
EVERY_DIALECT_HEADER = [
    ("x-original-url", "https://app.example.test/reports?q=1"),
    ("x-original-method", "GET"),
    ("x-forwarded-method", "GET"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "app.example.test"),
    ("x-forwarded-uri", "/reports?q=1"),
    ("host", "app.example.test"),
    ("accept", "text/html"),
    ("sec-fetch-mode", "navigate"),
    ("x-requested-with", "fetch"),
]
ORIGINAL = OriginalRequest("GET", "https", "app.example.test", "/reports?q=1")
ALL = Dialects(url_required=True, host_required=True)


@pytest.mark.parametrize(
    ("dialect", "path", "query"),
    [
        (ALL.nginx, "/auth", ""),
        (ALL.forward_auth, "/forward-auth", ""),
        (ALL.ext_authz, "/ext-authz/reports", "q=1"),
        (ALL.ext_authz_grpc, "/reports?q=1", ""),
    ],
    ids=lambda value: getattr(value, "name", None) or str(value),
)
def test_a_dialect_reads_only_the_headers_it_declares(dialect, path, query):
    headers = RecordingView(EVERY_DIALECT_HEADER)
    assert dialect.original(headers, "GET", path, query) == ORIGINAL
    login = Refusal(401, "session_missing", "no session", redirect="https://login.test/")
    assert dialect.refuse(login, headers, ORIGINAL).status in (302, 401)
    assert headers.asked <= set(dialect.reads) | set(NAVIGATION_HEADERS)
    assert set(dialect.reads) <= declared()


@pytest.mark.parametrize("entry", ["bridge.web.asgi", "bridge.web.app", "bridge.web.envoy_grpc"])
def test_an_entry_point_declares_every_header_before_it_serves(entry):
    """Declarations happen when a stage is imported: the module that builds the views
    must import every stage, or a view would drop a header read later."""
    every = sorted(
        _module(path)
        for path in PACKAGE.rglob("*.py")
        if "declare_read" in path.read_text() or path.stem == "dialects"
    )
    script = (
        "import importlib, sys\n"
        "from bridge.web import request\n"
        f"importlib.import_module({entry!r})\n"
        "first = sorted(request.declared())\n"
        f"for module in {every!r}: importlib.import_module(module)\n"
        "print(first == sorted(request.declared()), first)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("True"), out

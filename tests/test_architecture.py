"""The code's shape, as docs/architecture.md states it: imports go one way (no circle, counting every
import: module level, inside functions and under ``TYPE_CHECKING``), ``trainables`` never imports
``orchestrator``, each orchestrator package imports only the packages below it, and the driver
(``Sweep``) is known only to the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Orchestrator packages, lowest first: each may import the ones before it (and trainables), never after.
LAYERS = ["environment", "_adapters", "spec", "record", "tracking", "sweep", "bench", "report", "cli"]


def modules() -> dict[str, Path]:
    out = {}
    for top in ("orchestrator", "trainables"):
        for p in (ROOT / top).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its file."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m:
                    edges[m].add(n)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return imports(modules())


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "orchestrator" or len(parts) < 2:
        return None
    return LAYERS.index("cli" if parts[1] in ("cli", "commands") else parts[1])


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_trainables_never_import_the_orchestrator(graph):
    up = sorted((m, n) for m, ns in graph.items() if m.startswith("trainables") for n in ns
                if n.startswith("orchestrator"))
    assert up == []


def test_orchestrator_packages_import_only_the_ones_below(graph):
    wrong = sorted((m, n) for m, ns in graph.items() for n in ns
                   if layer(m) is not None and layer(n) is not None and layer(n) > layer(m))
    assert wrong == []


def test_only_the_command_line_knows_the_driver(graph):
    users = sorted(m for m, ns in graph.items() if "orchestrator.sweep.driver" in ns)
    assert users == ["orchestrator.commands"]


def test_the_import_reader_sees_imports_inside_functions_and_type_checking(tmp_path):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from orchestrator import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    edges = imports({"orchestrator": pkg / "__init__.py", "orchestrator.a": pkg / "a.py",
                     "orchestrator.b": pkg / "b.py"})
    assert "orchestrator.b" in edges["orchestrator.a"] and edges["orchestrator.b"] == {"orchestrator.a"}
    assert cycles(edges) == [["orchestrator.a", "orchestrator.b"]]

"""The import structure ARCHITECTURE.md promises, checked on the source (no module is imported).

Every product module's imports are read with `ast`, top-level and function-local alike (a local
import hides a circle from the interpreter, not from this test), and:
- no import circle among product modules;
- parsers/ and policies/ import nothing of the project outside their own package (pure layers);
- redirect_bpf/ never imports l7proxy/;
- product code never imports the demo or the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("l7proxy", "parsers", "policies", "redirect_bpf")
PROJECT = (*PRODUCT, "demo", "tests")  # every top-level name of this repository


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    out = {}
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imported_names(path: Path, name: str | None = None) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in the file (module `name`), relative ones resolved;
    `from X import Y` gives X.Y (Y may be a submodule or a name defined in X)."""
    tree = ast.parse(path.read_text(), str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            out += [(f"{parent}.{alias.name}", node.lineno) for alias in node.names]
    return out


def project_edges(modules: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported module, "file:line") for every import of a project name. `from X import
    Y` depends on the module X.Y when Y is one (a package's __init__ is not run for it again),
    else on X, whose body defines Y."""
    edges = []
    for name, path in modules.items():
        where = path.relative_to(REPO)
        for target, line in imported_names(path):
            if target.split(".")[0] not in PROJECT:
                continue
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]
            edges.append((name, target, f"{where}:{line}"))
    return edges


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """One circle per strongly connected component of more than one module (Tarjan); a
    component with more members than its circle gets them all in the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(circle_in(graph, comp), comp) for comp in components]


def circle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete circle inside a component: from its first module back to itself."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


@pytest.fixture(scope="module")
def edges():
    modules = product_modules()
    assert "l7proxy.agent.daemon" in modules and "policies" in modules  # the walk found the tree
    return modules, project_edges(modules)


def test_no_import_cycle_among_product_modules(edges):
    modules, found = edges
    graph: dict[str, set[str]] = {name: set() for name in modules}
    where: dict[tuple[str, str], str] = {}
    for src, dst, at in found:
        if dst in modules and dst != src:
            graph[src].add(dst)
            where.setdefault((src, dst), at)
    cycles = find_cycles(graph)
    described = [
        " -> ".join(c)
        + "  ("
        + ", ".join(where[(a, b)] for a, b in zip(c, c[1:], strict=False))
        + ")"
        + (f"; the knot holds {', '.join(comp)}" if len(comp) > len(c) - 1 else "")
        for c, comp in cycles
    ]
    assert not cycles, "import cycles among product modules:\n" + "\n".join(described)


@pytest.mark.parametrize("layer", ["parsers", "policies"])
def test_pure_layers_import_only_themselves(edges, layer):
    _, found = edges
    bad = [
        f"{at}: {src} imports {dst}"
        for src, dst, at in found
        if src.split(".")[0] == layer and dst.split(".")[0] != layer
    ]
    assert not bad, f"{layer}/ must import nothing of the project outside itself:\n" + "\n".join(
        bad
    )


def test_redirect_bpf_never_imports_l7proxy(edges):
    _, found = edges
    bad = [
        f"{at}: {src} imports {dst}"
        for src, dst, at in found
        if src.split(".")[0] == "redirect_bpf" and dst.split(".")[0] == "l7proxy"
    ]
    assert not bad, "redirect_bpf/ must not import l7proxy/:\n" + "\n".join(bad)


def test_product_never_imports_demo_or_tests(edges):
    _, found = edges
    bad = [
        f"{at}: {src} imports {dst}"
        for src, dst, at in found
        if dst.split(".")[0] in ("demo", "tests")
    ]
    assert not bad, "product code must not import the demo or the tests:\n" + "\n".join(bad)


def test_the_checker_sees_local_imports_and_names_the_circle(tmp_path):
    """The checker itself: a circle hidden by a function-local import is found and named."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    src = tmp_path / "m.py"
    src.write_text(
        "import os\n\ndef f():\n    from l7proxy.agent import node_proxy\n"
        "    from .. import gateway\n"
    )
    names = [n for n, _ in imported_names(src, "l7proxy.agent.m")]
    assert {"os", "l7proxy.agent.node_proxy", "l7proxy.gateway"} <= set(names)

"""Imports only point downstream (docs style: "imports only point downstream"): the
graph of imports between lenet_dist's modules, read from their source with `ast`,
has no cycle, counting the imports inside functions too (a lazy import that runs
back up is still a cycle, only a later one). The package root stays cheap: nothing
imports it but `__main__`, it imports only `versions` when it loads and `api` when a
name of the API is first used; `cli` is the top (only `__main__` imports it) and
`api` sits beside it (only the root's lazy `__getattr__` imports it).

No module is imported here: a syntax tree per file, so the test takes milliseconds.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "lenet_dist"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE
ROOT = PACKAGE  # the package's __init__


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "lenet_dist.cli"
    target: str  # imported module of the package, e.g. "lenet_dist.data", or ROOT
    line: int
    lazy: bool  # inside a function (runs when called, not when the module loads)

    def __str__(self) -> str:
        when = "in a function" if self.lazy else "at load"
        path = MODULES.get(self.source)
        where = path.relative_to(SOURCE.parent) if path else self.source
        return f"{self.source} -> {self.target} ({where}:{self.line}, {when})"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The package module `name` refers to (`lenet_dist.x.y` -> the longest module
    prefix), or None outside the package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def base_of(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module of `from X import ...`, relative imports included."""
    if not node.level:
        return node.module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def targets(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The package modules one import statement (or `importlib.import_module("...")`
    call with a literal name) loads; `from P import x` names the submodule P.x when
    there is one, else P itself."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = base_of(node, importer, is_package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
          and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
          in ("import_module", "__import__")):
        names = [node.args[0].value]
    else:
        return []
    return [t for t in dict.fromkeys(resolve(n) for n in names) if t is not None]


def imports_of(name: str) -> list[Edge]:
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    return edges_in(tree, name, path.name == "__init__.py")


def edges_in(tree: ast.AST, name: str, is_package: bool) -> list[Edge]:
    """Every import of a package module in `tree`, marked lazy inside a function."""
    edges: list[Edge] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for target in targets(node, name, is_package):
            if target != name:
                edges.append(Edge(name, target, node.lineno, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


EDGES = [edge for name in MODULES for edge in imports_of(name)]


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph as its edges, or None (depth-first, colouring nodes)."""
    out: dict[str, list[Edge]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[Edge] = []

    def dfs(node: str) -> list[Edge] | None:
        state[node] = "open"
        for edge in out.get(node, []):
            if state.get(edge.target) == "open":
                start = next((i for i, e in enumerate(path) if e.source == edge.target),
                             len(path))
                return [*path[start:], edge]
            if edge.target not in state:
                path.append(edge)
                found = dfs(edge.target)
                if found:
                    return found
                path.pop()
        state[node] = "done"
        return None

    for node in sorted(out):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_reader_sees_every_kind_of_import():
    """The graph is only as good as its reader: each import form becomes an edge."""
    source = ("import lenet_dist.data\n"
              "from lenet_dist import model as m, versions\n"
              "from lenet_dist.step import build_steps\n"
              "from . import mesh\n"
              "import importlib\n"
              "def late():\n"
              "    from lenet_dist import cli\n"
              "    import lenet_dist\n"
              "    return importlib.import_module('lenet_dist.api')\n")
    found = {(e.target, e.lazy) for e in edges_in(ast.parse(source), "lenet_dist.x", False)}
    assert found == {("lenet_dist.data", False), ("lenet_dist.model", False),
                     ("lenet_dist.versions", False), ("lenet_dist.step", False),
                     ("lenet_dist.mesh", False), ("lenet_dist.cli", True),
                     ("lenet_dist", True), ("lenet_dist.api", True)}
    assert find_cycle([Edge("a", "b", 1, False), Edge("b", "c", 1, True),
                       Edge("c", "a", 1, True)]) is not None
    assert find_cycle([Edge("a", "b", 1, False), Edge("a", "c", 1, True),
                       Edge("b", "c", 1, True)]) is None


def test_the_package_is_read():
    assert {ROOT, f"{PACKAGE}.__main__", f"{PACKAGE}.cli", f"{PACKAGE}.api",
            f"{PACKAGE}.versions"} <= set(MODULES)
    assert len(EDGES) > len(MODULES)  # the modules do import one another


def test_no_import_runs_back_up():
    cycle = find_cycle(EDGES)
    assert cycle is None, "an import cycle: " + "; ".join(map(str, cycle))


def test_nothing_but_main_imports_the_package_root():
    """`import lenet_dist` or `from lenet_dist import <not a module>` inside the
    package runs __init__'s lazy API imports from below it."""
    bad = [e for e in EDGES if e.target == ROOT and e.source != f"{PACKAGE}.__main__"]
    assert not bad, "\n".join(map(str, bad))


def test_the_package_root_imports_versions_at_load_and_api_lazily():
    mine = [e for e in EDGES if e.source == ROOT]
    assert {e.target for e in mine if not e.lazy} <= {f"{PACKAGE}.versions"}, \
        "\n".join(map(str, mine))
    assert {e.target for e in mine if e.lazy} <= {f"{PACKAGE}.api"}, "\n".join(map(str, mine))
    assert any(e.target == f"{PACKAGE}.api" and e.lazy for e in mine)  # the API's door


@pytest.mark.parametrize("top, allowed", [
    ("cli", {"__main__"}),
    ("api", set()),  # and the root's lazy __getattr__, below
])
def test_only_the_entry_points_import_the_top(top, allowed):
    bad = [e for e in EDGES if e.target == f"{PACKAGE}.{top}"
           and e.source not in {f"{PACKAGE}.{a}" for a in allowed}
           and not (top == "api" and e.source == ROOT and e.lazy)]
    assert not bad, "\n".join(map(str, bad))

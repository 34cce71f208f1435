"""The house's sizes, read from the source with `ast` (no module imported): no module of
lenet_dist over MAX_MODULE_LINES, the command line at most MAX_CLI_LINES (it parses and
calls; option machinery, formatting and failure reporting live beside it), and no
function over MAX_FUNCTION_LINES. A room that outgrows them is split at its natural
seams (CONTRIBUTING.md's map), not squeezed."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "lenet_dist"
MAX_MODULE_LINES = 600
MAX_CLI_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    return {p.name: p for p in sorted(SOURCE.rglob("*.py"))}


def test_no_module_is_over_the_limit():
    sizes = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
    assert sizes["cli.py"] <= MAX_CLI_LINES, sizes["cli.py"]


def functions(tree: ast.AST):
    """Every function and method, nested ones included, with its qualified name."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def test_no_function_is_over_the_limit():
    long = {}
    for name, path in modules().items():
        for qualname, node in functions(ast.parse(path.read_text())):
            lines = node.end_lineno - node.lineno + 1  # a command's option decorators aside
            if lines > MAX_FUNCTION_LINES:
                long[f"{name}:{qualname}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_limits_see_what_they_measure():
    """The walk finds methods and nested functions, and a long one is caught."""
    body = "\n".join(f"      x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"class A:\n  def m(self):\n    def inner():\n{body}\n    return 1\n")
    found = {name: node.end_lineno - node.lineno + 1 for name, node in functions(tree)}
    assert set(found) == {"A.m", "A.m.inner"}
    assert found["A.m.inner"] == MAX_FUNCTION_LINES + 1 > MAX_FUNCTION_LINES


def test_only_rundir_names_the_files_of_a_run_directory():
    """Every name inside a workdir (rundir.RUN_NAMES) is spelled in rundir.py alone; the
    others import it, so a rename is one edit and no reader looks in the wrong place."""
    from lenet_dist import rundir

    spelled = {}
    for name, path in modules().items():
        if name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in rundir.RUN_NAMES:
                spelled.setdefault(name, []).append(f"{node.value!r} at line {node.lineno}")
    assert not spelled, f"run-directory names spelled outside rundir.py: {spelled}"
    assert len(set(rundir.RUN_NAMES)) == len(rundir.RUN_NAMES) >= 9

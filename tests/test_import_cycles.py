"""No import circles in vlmkit: every module imports on its own, and no chain of module-level imports closes a loop.

Two checks, because each misses what the other finds:

* dynamic: each module imported first thing, with no other vlmkit module loaded (a circle that only
  bites in one import order shows up when its far end is imported first);
* static: the graph of module-level imports (``ast``; imports inside functions are lazy and do not
  count, nor ``if TYPE_CHECKING:`` blocks) has no cycle. Importing ``a.b.c`` also runs the
  ``__init__`` of ``a.b``, so that package is an edge too (unless the importer lives in it: it is
  already initialising). A cycle here is a latent failure even when today's order happens to work,
  e.g. ``vlmkit/__init__`` -> ``api`` -> ``conversion.engine`` -> ``conversion.output`` -> ``vlmkit``
  (for ``__version__``), which worked only because ``__version__`` was assigned before the import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import vlmkit

ROOT = Path(vlmkit.__file__).parent


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package of the tree under ``root``."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root.parent).with_suffix("").parts
        if not (file.parent / "__init__.py").is_file():
            continue  # not part of the package (e.g. a sitecustomize.py put on another program's path)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def _module_level(body: list[ast.stmt]):
    """The import statements that run when the module is imported (not those in functions or TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _module_level(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level(getattr(node, field, None) or [])


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the vlmkit modules its module-level imports load."""
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _module_level(ast.parse(file.read_text(), str(file)).body):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from x import y` loads x.y when y is a module, else only x
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in found:
                if target not in modules:
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the packages above the target run their __init__ too
                    above = ".".join(parts[:i])
                    implicit_and_not_mine = above != name and not name.startswith(above + ".")
                    if above == target or implicit_and_not_mine:
                        targets.add(above)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed chain (first module repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_chain(graph, set(g)) for g in groups]


def _chain(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest closed path through the group's first module (breadth first inside the group)."""
    start = min(group)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return sorted(group)


def test_no_module_level_import_closes_a_loop():
    found = cycles(import_graph(module_files()))
    assert not found, "import circles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_static_check_sees_a_circle_through_the_package_face(tmp_path):
    """The check itself: the old ``output.py -> vlmkit`` import (``__version__``) under an ``__init__`` that
    imports the API closes a loop; the same files with the version in a module of its own do not."""
    pkg = tmp_path / "pkg"
    (pkg / "conversion").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "1"\nfrom .api import convert\n')
    (pkg / "api.py").write_text("from .conversion import engine\n\ndef convert(): ...\n")
    (pkg / "conversion" / "__init__.py").write_text("")
    (pkg / "conversion" / "engine.py").write_text("from . import output\n")
    (pkg / "conversion" / "output.py").write_text("import json\n\nfrom .. import __version__\n")
    assert cycles(import_graph(module_files(pkg))) == [
        ["pkg", "pkg.api", "pkg.conversion.engine", "pkg.conversion.output", "pkg"]]

    (pkg / "_version.py").write_text('__version__ = "1"\n')
    (pkg / "conversion" / "output.py").write_text("from .._version import __version__\n")
    (pkg / "__init__.py").write_text("from ._version import __version__\nfrom .api import convert\n")
    assert cycles(import_graph(module_files(pkg))) == []


# Each module imported with no vlmkit module loaded before it (third-party modules stay cached: the circles
# this looks for are vlmkit's). One interpreter for all: a fresh one per module would take minutes.
IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "vlmkit" or m.startswith("vlmkit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(module_files())
    assert "vlmkit.conversion.output" in names and "vlmkit.cli" in names
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(names)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    assert run.returncode == 0, run.stderr
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())

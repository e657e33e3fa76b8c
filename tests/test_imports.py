"""Every module under toolkit/ imports, and no toolkit modules import each other in a circle.

How, and why this way:

1. Cycles are found in the source, not by importing: every module is parsed (ast) and each import of a toolkit
   module is an edge of a graph, wherever it is written. An import inside a function counts too: it is a dependency
   all the same, and a cycle closed by one (A imports B at the top, B imports A in a function) works only as long as
   nobody moves that import to the top or calls the function at import time. Imports under `if TYPE_CHECKING:` never
   run and are left out. `from toolkit.x import y` is an edge to the module toolkit.x.y when there is one, else to
   toolkit.x. A package is not made to depend on its own submodules' parent: importing toolkit.plan.memory runs
   toolkit/plan/__init__.py first, and a package that re-exports its submodules is not a cycle. Every strongly
   connected component of more than one module (or a module that imports itself) is a cycle, reported with its
   members. Importing modules could only find the cycles that break in the order tried; the graph has them all.
2. Each module is then imported, all of them in one fresh interpreter (`python -c`, importlib in a loop; a failure
   names the module): this catches a module that does not import at all (a name moved away, a dependency missing).
   Since 1. rules out every cycle, the order of imports cannot matter, so one interpreter is enough, and the test
   costs one start-up of the libraries (a few seconds) rather than one per module. `__main__` modules are left out of
   2. (importing them runs their command).
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO, script_env

PACKAGE = REPO / "toolkit"


def module_names() -> dict[str, object]:
    """toolkit module name -> its file."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(name: str, path, modules: dict) -> set[str]:
    """The toolkit modules `name` imports anywhere in its source, TYPE_CHECKING blocks left out."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # `import toolkit.plan.memory.x` is an import of the deepest module
            target = target.rpartition(".")[0]
        return target or None

    def visit(node) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "toolkit":
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "toolkit":
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    found.add(sub if sub in modules else resolve(source))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    found.discard(None)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_sees_a_cycle_closed_inside_a_function(tmp_path):
    """The check itself: a lazy import that closes a circle is a cycle; a package importing its submodules is not."""
    pkg = tmp_path / "toolkit"
    (pkg / "plan").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toolkit.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from toolkit import a\n")
    (pkg / "plan" / "__init__.py").write_text("from toolkit.plan.memory import x\n")
    (pkg / "plan" / "memory.py").write_text("from toolkit.plan import shapes\nx = 1\n")
    (pkg / "plan" / "shapes.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from toolkit.a import f\n")
    modules = {"toolkit": pkg / "__init__.py", "toolkit.a": pkg / "a.py", "toolkit.b": pkg / "b.py",
               "toolkit.plan": pkg / "plan" / "__init__.py", "toolkit.plan.memory": pkg / "plan" / "memory.py",
               "toolkit.plan.shapes": pkg / "plan" / "shapes.py"}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["toolkit.plan.memory"] == {"toolkit.plan.shapes"} and graph["toolkit.plan.shapes"] == set()
    assert cycles(graph) == [["toolkit.a", "toolkit.b"]]


def test_no_import_cycles_between_toolkit_modules():
    modules = module_names()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 40 and graph["toolkit.commands.plan"] >= {"toolkit.args.ranges", "toolkit.plan.hardware"}
    found = cycles(graph)
    assert not found, "import cycles (each line: modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found)


@pytest.mark.slow
def test_every_toolkit_module_imports_in_a_fresh_interpreter():
    names = [name for name in module_names() if not name.endswith("__main__")]
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as err:\n"
            "        sys.exit(f'importing {name} failed: {type(err).__name__}: {err}')\n")
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, env=script_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

"""The package's import graph: no module imports a module that imports it back, at import time or
from inside a function (where an import would only hide the cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hh_lightning"


def _modules() -> dict[str, Path]:
    """``{dotted name: source file}`` of every module of the package, its ``__init__``s included."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(body: list[ast.stmt], in_functions: bool = False) -> list[ast.stmt]:
    """The import statements that run when the module is imported, and with ``in_functions`` those
    in function bodies too; ``if TYPE_CHECKING:`` blocks never run."""
    found: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            found.append(statement)
        elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
            continue
        elif isinstance(statement, ast.If) and _is_type_checking(statement.test):
            found += _import_statements(statement.orelse, in_functions)
        else:
            blocks = [getattr(statement, field, []) for field in ("body", "orelse", "finalbody")]
            blocks += [handler.body for handler in getattr(statement, "handlers", [])]
            blocks += [case.body for case in getattr(statement, "cases", [])]
            for block in blocks:
                found += _import_statements(block, in_functions)
    return found


def _import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """``{module: the package's modules it imports at import time}`` (with ``in_functions``: at all)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for statement in _import_statements(ast.parse(path.read_text(encoding="utf-8")).body, in_functions):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    parts = alias.name.split(".")
                    # The deepest module of the package the dotted name reaches.
                    reached = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules]
                    targets.update(reached[:1])
                continue
            if statement.level:
                base_parts = package.split(".")[:len(package.split(".")) - statement.level + 1]
                base = ".".join([*base_parts, *([statement.module] if statement.module else [])])
            else:
                base = statement.module or ""
            if base not in modules:
                continue  # another distribution (torch, transformers, ...)
            for alias in statement.names:
                submodule = f"{base}.{alias.name}"
                # ``from . import x`` imports the module x; ``from .m import y`` reads y from m.
                targets.add(submodule if submodule in modules else base)
        targets.discard(name)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_from_the_sources() -> None:
    graph = _import_graph()
    assert {PACKAGE, f"{PACKAGE}.export", f"{PACKAGE}.export_format", f"{PACKAGE}.loading"} <= graph.keys()
    assert f"{PACKAGE}.export_format" in graph[f"{PACKAGE}.kernels"]
    assert f"{PACKAGE}.loading" in graph[f"{PACKAGE}.export"]
    assert f"{PACKAGE}.files" in graph[f"{PACKAGE}.cache"]  # an absolute ``from hh_lightning.files import``
    assert PACKAGE in graph[f"{PACKAGE}.export_format"]  # ``from . import __version__`` reads the package


def test_find_cycle_reports_the_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_inside_a_function_closes_a_cycle() -> None:
    graph = _import_graph(in_functions=True)
    # The package's __init__ imports its submodules on demand only (``quantize``, the transformers
    # hook), after it has set the ``__version__`` they read from it: not a cycle at run time.
    graph = {name: targets - {PACKAGE} for name, targets in graph.items() if name != PACKAGE}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle through an import inside a function: " + " -> ".join(cycle or [])


def test_the_package_imports_in_a_fresh_interpreter() -> None:
    result = subprocess.run([sys.executable, "-c", f"import {PACKAGE}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr

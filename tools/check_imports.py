"""Lists the imports between dcn_plugin's modules and checks two rules:

1. no import cycles: module A imports B, directly or through others, and B imports A;
2. no module imports another module's private names (``from .driver import _helper``).
   Importing a private *module* (``from . import _library``, ``from ._C import ...``) is fine.

Imports are read with ``ast`` (nothing is imported): at module level, inside functions, under
``if TYPE_CHECKING:``, and ``importlib.import_module("dcn_plugin...")`` with a literal name; each
kind is counted as an edge. Prints the cycles and the private
imports it finds, and exits with 1 when there are any.

    python tools/check_imports.py [--package-dir dcn_plugin] [--edges]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from typing import Dict, List, Set, Tuple

Edge = Tuple[str, str, str, int]  # importer, imported, kind (module/function/type-checking), line


def module_names(package_dir: pathlib.Path) -> Dict[str, pathlib.Path]:
    """``{dotted module name: path}`` for every ``.py`` file of the package."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(name: str, modules: Dict[str, pathlib.Path]) -> bool:
    return modules[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom, modules: Dict[str, pathlib.Path]) -> str:
    """The absolute name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_module_call(node: ast.AST) -> bool:
    """Whether ``node`` is ``importlib.import_module("<literal>")``."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _imports(tree: ast.AST):
    """Yields ``(node, kind)`` for every import statement (and ``import_module`` call), with where it
    sits."""

    def visit(node: ast.AST, kind: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif _import_module_call(child):
                yield child, kind
                yield from visit(child, kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), "type-checking")
                for statement in child.orelse:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                yield from visit(child, kind)

    yield from visit(tree, "module")


def scan(package_dir: pathlib.Path) -> Tuple[List[Edge], List[str]]:
    """The import edges inside the package, and the private-name imports (as messages)."""
    modules = module_names(package_dir)
    top = package_dir.name
    edges: List[Edge] = []
    private: List[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, kind in _imports(tree):
            if isinstance(node, ast.Call):
                name = node.args[0].value
                if name in modules:
                    edges.append((module, name, kind, node.lineno))
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top and alias.name in modules:
                        edges.append((module, alias.name, kind, node.lineno))
                continue
            source = _absolute(module, node, modules)
            if source.split(".")[0] != top:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from package import submodule`
                    edges.append((module, submodule, kind, node.lineno))
                    continue
                if source in modules:
                    edges.append((module, source, kind, node.lineno))
                name = alias.name
                compiled = source.split(".")[-1] == "_C"  # the compiled extension: no Python source
                if name.startswith("_") and not name.startswith("__") and not compiled:
                    private.append(f"{path}:{node.lineno}: {module} imports private name {name!r} "
                                   f"from {source}")
    return sorted(set(edges)), private


def cycles(edges: List[Edge]) -> List[List[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    graph: Dict[str, Set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = pathlib.Path(__file__).resolve().parent.parent / "dcn_plugin"
    parser.add_argument("--package-dir", default=str(default), help="the package to check")
    parser.add_argument("--edges", action="store_true", help="also print every import edge")
    args = parser.parse_args(argv)
    edges, private = scan(pathlib.Path(args.package_dir))
    modules = {m for e in edges for m in e[:2]}
    kinds = {kind: sum(e[2] == kind for e in edges) for kind in ("module", "function", "type-checking")}
    print(f"{len(modules)} modules, {len(edges)} import edges inside the package "
          f"({', '.join(f'{n} {k}-level' for k, n in kinds.items())})")
    if args.edges:
        for a, b, kind, line in edges:
            print(f"  {a} -> {b}  ({kind}, line {line})")
    found = cycles(edges)
    for component in found:
        print("cycle:", " <-> ".join(component))
        members = set(component)
        for a, b, kind, line in edges:
            if a in members and b in members:
                print(f"  {a} -> {b}  ({kind}, line {line})")
    for message in private:
        print(message)
    print(f"{len(found)} import cycle(s), {len(private)} private-name import(s)")
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main())

"""The import graph of the project's packages: no cycles, and no private name imported from another module.

Every ``import`` counts, at module level or inside a function (a lazy import is still a dependency); imports
under ``if TYPE_CHECKING:`` are annotations only and are left out. Parsed with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterator, NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
# The project's packages, highest layer first (docs/architecture.md).
LAYERS = ("vmem", "evaluation", "serving", "pipelines", "configs", "memory", "encoders")


class Import(NamedTuple):
    """One imported name: ``from target import name`` (name None for ``import target``), at ``line``."""
    target: str
    name: str | None
    line: int


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(packages: tuple[str, ...]) -> dict[str, pathlib.Path]:
    return {_module_name(p): p for package in packages for p in sorted((REPO / package).rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(module: str, path: pathlib.Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (Import(alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative: resolved against this module's package.
                package = module.split(".")[:len(module.split(".")) - (0 if path.name == "__init__.py" else 1)]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            yield from (Import(base, alias.name, node.lineno) for alias in node.names)


def _owner(imp: Import, modules: dict[str, pathlib.Path]) -> str | None:
    """The project module an import reads from (``from pkg import submodule`` reads the submodule)."""
    if imp.name is not None and f"{imp.target}.{imp.name}" in modules:
        return f"{imp.target}.{imp.name}"
    target = imp.target
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imp in _imports(module, path):
            owner = _owner(imp, modules)
            if owner is not None and owner != module:
                graph[module].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _private_imports(modules: dict[str, pathlib.Path], sources: dict[str, pathlib.Path]) -> list[str]:
    """``module:line imports _name from other`` for every private name a module of ``sources`` takes from
    another module of ``modules``."""
    out = []
    for module, path in sources.items():
        for imp in _imports(module, path):
            owner = _owner(imp, modules)
            private = imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__")
            if private and owner is not None and owner != module:
                out.append(f"{module}:{imp.line} imports {imp.name} from {owner}")
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph(_modules(LAYERS)))
    assert not cycles, "import cycles (move the shared code to the module that owns it):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    modules = _modules(LAYERS)
    found = _private_imports(modules, modules)
    assert not found, "private names imported from another module (make a public, documented function in " \
                      "the module that owns the concept):\n" + "\n".join(found)


def test_no_private_test_helpers_imported_across_test_modules():
    tests = _modules(("tests",))
    found = _private_imports(tests, tests)
    assert not found, "private test helpers imported from another test module:\n" + "\n".join(found)



def _upward(graph: dict[str, set[str]]) -> list[str]:
    """``module -> imported`` for every import from a higher layer of LAYERS than the importer's own."""
    rank = {package: i for i, package in enumerate(LAYERS)}
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if rank[target.split(".")[0]] < rank[module.split(".")[0]])


def test_upward_finder_finds_an_upward_import():
    assert _upward({"memory.a": {"pipelines.b", "encoders.c"}, "pipelines.b": {"memory.a"}}) == [
        "memory.a -> pipelines.b"]


def test_imports_only_point_down_the_layers():
    found = _upward(_graph(_modules(LAYERS)))
    assert not found, (f"imports against the layering {' -> '.join(LAYERS)} (move the code down to the layer "
                       "that owns it, or have the higher layer pass it in):\n" + "\n".join(found))


def test_memory_never_imports_beam():
    found = [f"{module}:{imp.line}" for module, path in _modules(("memory",)).items()
             for imp in _imports(module, path) if imp.target.split(".")[0] == "apache_beam"]
    assert not found, "memory/ must stay usable without Beam; Beam imports found at:\n" + "\n".join(found)


def test_tests_import_no_private_production_names():
    """Tests drive public names only (DoFns included, whose lifecycle some tests drive by hand)."""
    tests, modules = _modules(("tests",)), _modules(LAYERS)
    found = _private_imports(modules, tests)
    assert not found, "tests importing private production names (make the name public and documented):\n" + \
        "\n".join(found)

"""The house's layers, checked on the import graph (parsed with `ast`, nothing imported):

    optforge.cli, optforge.commands       the top: may import anything; nothing imports optforge.cli
    optforge.passes, .evals, .runtime     import the core; the runtime never imports a pass
    optforge (the core, formats and model_io included)   imports nothing above it at module level

and the core has no import cycle: none at module level, and none even through imports inside functions
(imports under `if TYPE_CHECKING:` never run, so they count only for the runtime/passes rule; the root package
`optforge`, which holds `__version__` and runs before any module under it, is no link of a cycle).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"optforge": "optforge", "passes": "optforge.passes", "evals": "optforge.evals", "runtime": "optforge.runtime"}
ABOVE_CORE = ("optforge.passes", "optforge.evals", "optforge.runtime")
TOP = ("optforge.cli", "optforge.commands")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    when: str  # "module level", "inside a function" or "type checking only"

    @property
    def module_level(self) -> bool:
        return self.when == "module level"

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}: {self.source} imports {self.target} ({self.when})"


def find_modules() -> dict[str, Path]:
    """Dotted name -> file, for every .py file inside a package (a folder chain with __init__.py)."""
    found = {}
    for folder, dotted in ROOTS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if any(not (root / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(len(rel.parts))):
                continue  # a script folder (e.g. runtime/cpp/tools), not part of the package
            parts = [dotted, *rel.parts[:-1]] + ([] if path.name == "__init__.py" else [path.stem])
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, when) for every import: at module level, inside a function, or under `if TYPE_CHECKING:`."""

    def walk(node: ast.AST, when: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, when
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from walk(child, "type checking only")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and when == "module level":
                yield from walk(child, "inside a function")
            else:
                yield from walk(child, when)

    yield from walk(tree, "module level")


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, when in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the module pkg.sub where there is one, else names of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target == "optforge" or target.startswith("optforge."):
                    edges.append(Edge(name, target, path, node.lineno, when))
    return edges


MODULES = find_modules()
EDGES = import_edges(MODULES)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_core(name: str) -> bool:
    return name.startswith("optforge") and not _under(name, ABOVE_CORE + TOP)


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph as its edges, or None. Edges into the root package `optforge` are left out."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.target != "optforge":
            graph.setdefault(e.source, []).append(e)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[Edge] = []

    def visit(node: str) -> list[Edge] | None:
        state[node] = 1
        for e in graph.get(node, []):
            if state.get(e.target) == 1:
                start = next(i for i, p in enumerate(path + [e]) if p.source == e.target)
                return (path + [e])[start:]
            if e.target not in state:
                path.append(e)
                found = visit(e.target)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_covers_every_layer():
    assert {"optforge.formats", "optforge.model_io", "optforge.passes.quant.rtn", "optforge.runtime.llm", "optforge.evals.tasks"} <= set(MODULES)
    assert any(e.source == "optforge.model_io" and e.target == "optforge.formats" for e in EDGES)


def test_the_runtime_never_imports_a_pass():
    bad = [e for e in EDGES if _under(e.source, ("optforge.runtime",)) and _under(e.target, ("optforge.passes",))]
    assert not bad, "the runtime imports a pass (move what both need into optforge/formats or the core):\n" + "\n".join(map(str, bad))


def test_the_core_imports_nothing_above_it_at_module_level():
    bad = [e for e in EDGES if e.module_level and is_core(e.source) and _under(e.target, ABOVE_CORE)]
    assert not bad, "a core module imports passes/evals/runtime at module level:\n" + "\n".join(map(str, bad))


def test_the_core_has_no_import_cycle_at_module_level():
    cycle = find_cycle([e for e in EDGES if e.module_level and is_core(e.source) and is_core(e.target)])
    assert cycle is None, "import cycle in the core at module level:\n" + "\n".join(map(str, cycle))


def test_the_core_and_the_cli_have_no_import_cycle_even_inside_functions():
    core_or_top = [e for e in EDGES if e.when != "type checking only" and not _under(e.source, ABOVE_CORE) and not _under(e.target, ABOVE_CORE)]
    cycle = find_cycle(core_or_top)
    assert cycle is None, "import cycle in the core or the CLI (counting imports inside functions):\n" + "\n".join(map(str, cycle))


def test_nothing_imports_the_cli():
    """The CLI loads its command modules by name (`cli.COMMAND_MODULES`); they share `commands/console.py`. Only
    `python -m optforge` (optforge/__main__.py, what torchrun starts) runs it."""
    bad = [e for e in EDGES if _under(e.target, ("optforge.cli",)) and e.source != "optforge.__main__"]
    assert not bad, "optforge.cli is the entry point, imported by nothing but optforge.__main__:\n" + "\n".join(map(str, bad))


def test_the_checks_catch_a_bad_edge():
    fake = REPO / "optforge" / "x.py"
    cycle = find_cycle([Edge("optforge.a", "optforge.b", fake, 1, "module level"), Edge("optforge.b", "optforge.a", fake, 2, "module level")])
    assert [e.target for e in cycle] == ["optforge.b", "optforge.a"]
    assert "optforge/x.py:2: optforge.b imports optforge.a (module level)" in "\n".join(map(str, cycle))
    assert is_core("optforge.formats.int8") and is_core("optforge.model_io") and not is_core("optforge.commands.cache")

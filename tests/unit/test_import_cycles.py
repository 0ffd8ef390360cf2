"""No import cycles among the modules of cluster/ and stages/ (issue 10, point 6).

The graph is built from the source with :mod:`ast` (nothing is imported). Counted: every
``import`` / ``from ... import`` anywhere in a module, module level, inside functions and
under ``if TYPE_CHECKING:`` alike: a lazy or type-only import still ties the two modules
together (neither can be read, moved or tested alone), so hiding a cycle in a function does
not remove it. Not counted: the implicit import of a parent package (``import a.b.c`` runs
``a/__init__`` and ``a/b/__init__``), since packages re-export their own modules by design.
``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("cluster", "stages")


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for top in ROOTS:
        for path in (root / top).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ``mods`` that ``name`` (a module or a name in one) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, package: str, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def import_graph(root: Path = REPO) -> nx.DiGraph:
    """Directed graph module -> imported module over ``root``'s cluster/ and stages/ (see
    module docstring)."""
    mods = _modules(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, package, mods):
                owner = _owner(target, mods)
                if owner is not None and owner != name:
                    graph.add_edge(name, owner)
    return graph


def import_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components > 1), sorted."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def test_counts_function_level_type_checking_and_relative_imports(tmp_path):
    pkg = tmp_path / "stages" / "demo"
    pkg.mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from stages.demo.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from stages.demo import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (pkg / "c.py").write_text("from . import a\nimport stages.demo.b\n")
    cycles = import_cycles(import_graph(tmp_path))
    assert cycles == [["stages.demo.a", "stages.demo.b", "stages.demo.c"]]
    # the package's re-export of its own module is an edge, the implicit parent import is not
    assert import_graph(tmp_path).has_edge("stages.demo", "stages.demo.a")
    assert not import_graph(tmp_path).has_edge("stages.demo.a", "stages.demo")


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layer_boundaries():
    """cluster/scheduler is plain Python (no torch, no engine); cluster/capacity does not reach
    into the engine; stages/ never imports cluster/ or ray."""
    graph = import_graph()
    for name in graph:
        targets = set(graph.successors(name))
        if name.startswith("cluster.scheduler"):
            assert not {t for t in targets if not t.startswith(("cluster.scheduler", "stages.config", "stages.errors"))}, name
            assert not _third_party(name) & {"torch", "numpy", "ray"}, name
        if name.startswith("cluster.capacity"):
            assert not {t for t in targets if t.startswith("cluster.engine")}, name
        if name.startswith("stages"):
            assert not {t for t in targets if t.startswith("cluster")} and "ray" not in _third_party(name), name


def _third_party(module: str) -> set[str]:
    """Top-level names of everything ``module`` imports (anywhere in it)."""
    path = _modules(REPO)[module]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names

"""The layers hold: cli -> ops -> formats -> (model, errors, dtypes, sources); nothing imports a
layer above its own, and no two modules import each other, directly or round a loop.

Read from the source with `ast` (every import, also those inside functions, which is where the
lazy ones live), so the check costs no imports and sees the imports a run might never reach."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "ckptctl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(path: Path) -> set[str]:
    """Every ckptctl module `path` imports (a `from pkg import name` counts as pkg.name when that
    is a module, else as pkg)."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ckptctl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "ckptctl":
                continue
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in out if m != name}


FILES = sorted(PKG.rglob("*.py"))
MODULES = {_module_name(p) for p in FILES}
GRAPH = {_module_name(p): _imports(p) for p in FILES}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in ("cli", "ops", "formats"):
        return parts[1]
    return "cli" if mod == "ckptctl.__main__" else "core"


ALLOWED = {
    "cli": {"cli", "ops", "formats", "core"},
    "ops": {"ops", "formats", "core"},
    "formats": {"formats", "core"},
    "core": {"core"},
}


def test_the_graph_is_read():
    # guards the reader above: these edges exist today and must be seen
    assert "ckptctl.formats" in GRAPH["ckptctl.ops.convert"]
    assert any(m.startswith("ckptctl.ops") for m in GRAPH["ckptctl.cli.convert"])
    assert len(GRAPH) > 40


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_module_imports_a_layer_above_its_own(mod):
    bad = sorted(m for m in GRAPH[mod] if m in MODULES and _layer(m) not in ALLOWED[_layer(mod)])
    assert not bad, f"{mod} ({_layer(mod)}) imports {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ that imports its own submodules (a registry, re-exports) and the
    submodules that import names from it are one unit, not a cycle between ideas: fold each
    submodule's import of its own package away."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_package_inits(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_over_600_lines(path):
    # one idea per module: past ~600 lines a module holds several, and a newcomer has to read all
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= 600, f"{path.relative_to(SRC)} has {n} lines: split it by idea"

"""The layout docs/architecture.md draws, held: each folder imports only what its row of the
table allows, and no module imports itself around a loop. Read from the source (ast), so a
lazy import inside a function counts too; imports under `if TYPE_CHECKING:` do not."""

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("hooks", "weight_mapping", "optimizer", "checkpoint", "server")
# docs/architecture.md, "may import (project)"; a part may always import itself
MAY_IMPORT = {
    "hooks": set(),
    "weight_mapping": {"hooks"},
    "optimizer": set(),
    "checkpoint": set(),
    "server": set(),
    "server.settings": set(),
    "server.engine": {"optimizer", "weight_mapping", "checkpoint", "server.settings"},
    "server.api": {"server.engine", "server.settings", "weight_mapping", "checkpoint"},
    "server.client": {"server.settings"},
    "server.console": set(),
    "server.app": {"server.api", "server.engine", "server.settings"},
    "server.default_model": {"server.engine", "server.settings"},
    "server.__main__": {"server.app", "server.engine", "server.settings", "weight_mapping"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from package import module` names the module)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = ".".join(package[:len(package) - node.level + 1] +
                            ([node.module] if node.module else [])) if node.level \
                else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "server" and len(parts) > 1 else parts[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_each_part_imports_only_what_the_architecture_allows():
    graph = _graph()
    unlisted = {_part(m) for m in graph} - set(MAY_IMPORT)
    assert not unlisted, f"parts docs/architecture.md does not list: {unlisted}"
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                   if _part(d) != _part(m) and _part(d) not in MAY_IMPORT[_part(m)])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph, index, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component or v in graph[v]:
                cycles.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    assert graph and not cycles, cycles

"""The package's layers: imports run one way, and nothing outside the core reaches into
the engine's private attributes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mmsb

PKG = Path(mmsb.__file__).parent

# Lower rank = lower layer. A module may import only modules of its own rank or lower
# (the core's modules among themselves, history from the core, ...).
RANKS = [
    ("mmsb.errors", 0), ("mmsb.types", 0), ("mmsb.config", 0),
    ("mmsb._core", 1),
    ("mmsb._history", 2), ("mmsb._storage", 2), ("mmsb._device", 2), ("mmsb._instrument", 2),
    ("mmsb._api", 3), ("mmsb._reader", 3), ("mmsb._replication", 3),
    ("mmsb.metrics", 4), ("mmsb.cli", 4), ("mmsb.bench", 4), ("mmsb.integrations", 4),
    ("mmsb.ui", 4),
    ("mmsb.__main__", 5), ("mmsb", 5),
]


def rank(module: str) -> int:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    raise AssertionError(f"module {module} belongs to no layer; add it to RANKS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every mmsb module ``path`` imports, inside functions too, except under
    ``if TYPE_CHECKING:``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, mod: str, is_package: bool = False) -> set[str]:
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if getattr(node.test, "id", None) == "TYPE_CHECKING":
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("mmsb"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mmsb"):
                found.add(target)

    Visitor().visit(ast.parse(source))
    return found


SOURCES = sorted(PKG.rglob("*.py"))


def test_the_layers_cover_the_package() -> None:
    assert len(SOURCES) > 30
    for path in SOURCES:
        rank(module_name(path))


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for path in SOURCES:
        mod = module_name(path)
        for target in imports_of(path):
            if target == "mmsb" or mod.startswith(target + "."):
                continue  # the package itself, or a module's own parent package
            if rank(target) > rank(mod):
                bad.append(f"{mod} imports {target}")
    assert not bad, "imports that run upward:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = {module_name(p): {t for t in imports_of(p)} for p in SOURCES}
    known = set(graph)
    for mod, targets in graph.items():
        graph[mod] = {t for t in targets if t in known and t != mod
                      and not t.startswith(mod + ".") and not mod.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    for start in graph:
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_sees_imports_inside_functions_but_not_type_checking() -> None:
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from .engine import MMSBState\n"
           "def f():\n    from .._api import create_page\n")
    assert imports_in(src, "mmsb._core.mod") == {"mmsb._api"}
    assert rank("mmsb._api") > rank("mmsb._core.engine")


PRIVATE = re.compile(r"\b(?:state|st|target|fresh|new|origin)\._(?!_)[a-z]\w*")


def test_outside_the_core_no_private_engine_attributes() -> None:
    bad = []
    for path in SOURCES:
        if module_name(path).startswith("mmsb._core"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                bad.append(f"{path.relative_to(PKG)}:{n}: {line.strip()}")
    assert not bad, "private engine attributes used outside the core:\n" + "\n".join(bad)

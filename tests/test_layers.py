"""README "Layout": imports point down the layer table only — checked on every import statement of the package,
lazy ones inside functions included (a lazy import up the table is still a dependency up the table)."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(__file__), "..", "freezepack")
# rank of each layer (README's table, top = highest); a module may import only from its own rank or lower
RANKS = {"errors": 0, "atomic": 0, "parallel": 0, "_version": 0, "format": 1, "method": 2, "api": 3, "conversion": 3,
         "checkpoint": 3, "hf": 3,
         "experiments": 4, "fleet": 5, "cli": 6}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def _imports():
    for directory, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(directory, f)
            rel = os.path.relpath(path, os.path.join(PKG, ".."))[:-3].replace(os.sep, ".")
            package = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[:len(package.split(".")) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                        names = [target + "." + a.name for a in node.names] if node.module is None else [target]
                    else:
                        names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    if name.startswith("freezepack."):
                        yield rel, name


def test_imports_point_down_the_layer_table():
    up = [(mod, target) for mod, target in _imports()
          if _layer(mod) and _layer(target) and RANKS[_layer(target)] > RANKS[_layer(mod)]]
    assert not up, f"imports up the layer table: {up}"


def test_the_checker_sees_lazy_and_relative_imports():
    found = set(_imports())
    assert ("freezepack.cli.demo", "freezepack.experiments.demo") in found          # lazy, relative
    assert ("freezepack.api.saving", "freezepack.method.freezenet") in found        # lazy, relative


def test_no_import_cycle_lazy_imports_included():
    """No module reaches itself through imports, counting those inside functions (a function-level import that
    dodges a cycle is a cycle). A module's own parent packages do not count: Python imports them first anyway."""
    graph: dict[str, set[str]] = {}
    modules = {mod for mod, _ in _imports()}
    for mod, target in _imports():
        mod = mod[:-len(".__init__")] if mod.endswith(".__init__") else mod
        while target not in modules and target + ".__init__" not in modules and "." in target:
            target = target.rsplit(".", 1)[0]  # `from pkg import name`: the module pkg (or the name's module)
        if target != mod and not mod.startswith(target + "."):
            graph.setdefault(mod, set()).add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_over_600_lines():
    long = []
    for directory, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(directory, f), encoding="utf-8") as fh:
                    n = sum(1 for _ in fh)
                if n > 600:
                    long.append((os.path.relpath(os.path.join(directory, f), PKG), n))
    assert not long, f"modules over 600 lines (one concept per module): {long}"

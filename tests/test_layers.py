"""README "Layout": imports point down the layer table only — checked on every import statement of the package,
lazy ones inside functions included (a lazy import up the table is still a dependency up the table)."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(__file__), "..", "freezepack")
# rank of each layer (README's table, top = highest); a module may import only from its own rank or lower
# atomic re-exports format.io (the one atomic_write), so it sits on the format layer
RANKS = {"errors": 0, "atomic": 1, "_version": 0, "format": 1, "method": 2, "api": 3, "conversion": 3,
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
    assert any(mod.startswith("freezepack.api") and target == "freezepack.method.freezenet"
               for mod, target in found)                                           # lazy, relative

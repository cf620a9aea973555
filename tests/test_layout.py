"""The package's layering: each layer imports only the layers below it (module-level imports and those inside
functions alike), so utilities sit at the bottom, methods own their settings, and the loop is above them all.
A new upward import fails `test_every_import_goes_down`; the import graph also has no cycles."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autolora")

# layer -> the layers it may import (besides itself). Read top-down: cli > workflows > engine > methods > eval,
# config > attacks, data, models > utils > errors.
ALLOWED = {
    "errors": set(),
    "utils": {"errors"},
    "attacks": {"errors", "utils"},
    "data": {"errors", "utils"},
    "models": {"errors", "utils"},
    "config": {"errors", "utils", "attacks"},  # the attack names (attacks.registry imports no torch)
    "eval": {"errors", "utils", "attacks", "data"},
    "methods": {"errors", "utils", "attacks", "data", "models", "config"},
    "engine": {"errors", "utils", "attacks", "data", "models", "config", "eval", "methods"},
    "workflows": {"errors", "utils", "attacks", "data", "models", "config", "eval", "methods", "engine"},
    "cli": {"errors", "utils", "attacks", "data", "models", "config", "eval", "methods", "engine", "workflows"},
    "package": {"cli"},  # autolora/__init__.py (lazy API) and __main__.py
}


def _modules() -> dict[str, str]:
    mods = {}
    for dp, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                name = "autolora." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _edges(mods):
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    p = pkg
                    for _ in range(node.level - 1):
                        p = p.rsplit(".", 1)[0]
                    base = f"{p}.{base}" if base else p
                names = [f"{base}.{a.name}" for a in node.names] if base.startswith("autolora") else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("autolora")]
            for t in names:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m and not (mods[t].endswith("__init__.py") and m.startswith(t + ".")):
                    edges[m].add(t)
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "package"
    return parts[1]


def upward_imports(edges) -> list[str]:
    bad = []
    for m, targets in edges.items():
        for t in targets:
            a, b = layer(m), layer(t)
            if a != b and b not in ALLOWED[a]:
                bad.append(f"{m} -> {t} ({a} may not import {b})")
    return sorted(bad)


def test_every_module_has_a_layer():
    assert {layer(m) for m in _modules()} <= set(ALLOWED)


def test_every_import_goes_down():
    assert upward_imports(_edges(_modules())) == []


def test_the_check_catches_an_upward_import():
    edges = _edges(_modules())
    edges["autolora.utils.fileio"].add("autolora.engine.loop")  # a utility reaching up into the trainer
    edges["autolora.methods.autolora"].add("autolora.engine.schedules")
    assert upward_imports(edges) == ["autolora.methods.autolora -> autolora.engine.schedules (methods may not import "
                                     "engine)", "autolora.utils.fileio -> autolora.engine.loop (utils may not import "
                                     "engine)"]


def test_the_import_graph_has_no_cycles():
    edges = _edges(_modules())
    state, cycles, stack = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert sum(map(len, edges.values())) > 50 and cycles == []

"""The package layout: every module's imports (module level and inside functions) form a graph without cycles,
and each job has its room (engine/, eval.py, attacks/, models/, methods/, workflows/, cli/)."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autolora")


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


def test_each_job_has_its_room():
    mods = _modules()
    for name in ("autolora.engine.loop", "autolora.engine.rundir", "autolora.engine.runtime", "autolora.engine.schedules",
                 "autolora.eval", "autolora.attacks.autoattack", "autolora.models.export", "autolora.models.weights",
                 "autolora.methods.lora", "autolora.workflows.pretrain", "autolora.workflows.compare",
                 "autolora.workflows.demo", "autolora.workflows.report", "autolora.cli.train", "autolora.cli.eval"):
        assert name in mods, name
    for gone in ("autolora.trainer", "autolora.evaluate", "autolora.io", "autolora.distributed", "autolora.accel",
                 "autolora.runtime", "autolora.commands"):
        assert gone not in mods, gone

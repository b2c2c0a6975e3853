"""The layout's rules, checked on the source: private library names in one module, imports one way."""

import ast
import re

from conftest import ROOT

PACKAGES = ("trainer", "search", "benchmarks")
# A private attribute or module of Optuna or Ray: ``study._storage``, ``trial._trial_id``,
# ``optuna.storages._heartbeat``, OptunaSearch's ``_ot_trials`` ...
PRIVATE = re.compile(r"\b(optuna|ray)(\.\w+)*\._\w+|\._(storage|trial_id|study_id|ot_\w+|completed_trials|"
                     r"get_stale_trial_ids|suggest)\b")


def sources():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_private_optuna_and_ray_names_live_in_compat_only():
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources() if p.name != "compat.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not offenders, offenders
    compat = (ROOT / "search" / "compat.py").read_text()
    assert PRIVATE.search(compat)  # the pattern does find what compat holds


def imports(path):
    """Project modules ``path`` imports when it runs: at module level or inside a function (where the old
    ``config.build`` hid its import of ``trainer.models``), not under ``if TYPE_CHECKING:``."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.split(".")[0] in ("trainer", "search")}


def graph():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for pkg in ("trainer", "search") for p in (ROOT / pkg).glob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles_and_trainer_never_imports_search():
    edges = graph()
    assert not [(a, b) for a, deps in edges.items() if a.startswith("trainer") for b in deps
                if b.startswith("search")]
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    assert "trainer.models" in edges["trainer.config"] and "search.pruners" in edges["search.space"]  # sees edges

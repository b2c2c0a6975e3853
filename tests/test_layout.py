"""The layout's rules, checked on the source: private library names in the compat modules, imports one way;
and the test suite's own rule for PostgreSQL."""

import ast
import os
import subprocess
import sys

from conftest import ROOT

PACKAGES = ("trainer", "search", "benchmarks")
# The private names of Optuna, Ray and PyTorch that each compat module may touch (an attribute, or a module
# imported from): a new one is added here, on purpose, or the test fails.
ALLOWED = {
    "search/compat.py": {"_storage", "_trial_id", "_study_id", "_get_stale_trial_ids", "_ot_study", "_ot_trials",
                         "_completed_trials", "_tune_controller", "_cached_trial_decisions",
                         "optuna.artifacts._protocol", "optuna.storages._heartbeat"},
    "trainer/compat.py": {"_foreach_norm", "torch._dynamo.utils", "torch.utils._python_dispatch"},
}
PUBLIC = {"_replace", "_asdict", "_fields",  # namedtuple's own API, underscored to stay out of field names
          "_exit"}  # os._exit, the documented exit without clean-up


def sources():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def private_names(path):
    """The private names ``path`` touches: ``x._name`` (but ``self``'s and ``cls``'s own), a module with a
    private part imported from, a private name imported."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and node.attr not in PUBLIC:
                found.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                found.add(node.module)
            found.update(a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if any(p.startswith("_") for p in a.name.split(".")))
    return found


def test_private_library_names_live_in_the_compat_modules_and_only_those_listed():
    """Any ``._name`` of Optuna, Ray or PyTorch (or of another module) outside the two compat modules fails,
    and each compat module uses only the names ``ALLOWED`` lists for it."""
    offenders = {str(p.relative_to(ROOT)): names for p in sources()
                 if str(p.relative_to(ROOT)) not in ALLOWED and (names := private_names(p))}
    assert not offenders, offenders
    for module, allowed in ALLOWED.items():
        used = private_names(ROOT / module)
        assert used and used <= allowed, (module, used - allowed)


def test_every_table_of_names_is_a_registry():
    """A module-level table keyed by names (a dict of string keys) is a ``trainer.registry.Registry``: one
    message for an unknown name, one way to list the names for the config, the space and the docs."""
    tables = []
    for p in (q for q in sources() if q.parts[-2] in ("trainer", "search")):
        for node in ast.parse(p.read_text()).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.DictComp) or (isinstance(value, ast.Dict) and value.keys and all(
                    isinstance(k, ast.Constant) and isinstance(k.value, str) for k in value.keys)):
                tables.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not tables, tables


def test_every_exception_derives_from_the_one_root():
    """``except SNNError`` takes every error the project raises (bad input, unwritable files, divergence); the
    stop signal alone is a ``KeyboardInterrupt``, so that no ``except Exception`` takes it for a failure."""
    import importlib
    import inspect

    from trainer.errors import SNNError
    from trainer.stop import Stopped

    classes = {}
    for p in (q for q in sources() if q.parts[-2] in ("trainer", "search") and q.name != "__main__.py"):
        module = importlib.import_module(".".join(p.relative_to(ROOT).with_suffix("").parts))
        classes |= {f"{module.__name__}.{name}": cls for name, cls in inspect.getmembers(module, inspect.isclass)
                    if issubclass(cls, BaseException) and cls.__module__ == module.__name__}
    assert len(classes) >= 12, sorted(classes)
    strays = [name for name, cls in classes.items() if not issubclass(cls, SNNError) and cls is not Stopped]
    assert not strays, strays
    assert issubclass(Stopped, KeyboardInterrupt) and not issubclass(Stopped, Exception)


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


def test_the_heads_know_models_not_configs():
    """``trainer.heads`` reads a model's outputs (``trainer.taps``); nothing it imports, however indirectly,
    imports the config (the dry run that checks a config is ``trainer.probe``'s)."""
    edges, seen, todo = graph(), set(), ["trainer.heads"]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert "trainer.taps" in seen and "trainer.config" not in seen, sorted(seen)


PROBE = """
import importlib.util

spec = importlib.util.spec_from_file_location("project_conftest", {conftest!r})
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
pg_url = project.pg_url
"""


def test_the_postgresql_tests_skip_without_a_server_unless_ci_is_set(tmp_path):
    """A laptop without PostgreSQL skips them with the reason; CI, where ``CI`` is set, fails instead."""
    (tmp_path / "conftest.py").write_text(PROBE.format(conftest=str(ROOT / "tests" / "conftest.py")))
    (tmp_path / "test_probe.py").write_text("def test_needs_postgres(pg_url):\n    assert pg_url\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER")}
    env["SNN_TEST_POSTGRES"] = "postgresql://postgres@127.0.0.1:1"  # nothing listens there
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)]
    skipped = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "PostgreSQL is not reachable at postgresql://postgres@127.0.0.1:1" in skipped.stdout
    failed = subprocess.run(cmd, cwd=tmp_path, env={**env, "CI": "1"}, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout

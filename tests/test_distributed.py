"""Many workers: PostgreSQL studies shared by processes, and the Ray Tune backend (2 local CPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.export import select
from search.space import load_space

from conftest import ROOT

SERVER = "postgresql://postgres@127.0.0.1:5432"

SPACE = """
study: {{name: shared, seed: 0, pruner: none, heartbeat: 1{study}}}
base:
  data: {{limit: 48, timesteps: 2, batch_size: 16}}
  model: {{width: 4}}
  optim: {{epochs: {epochs}}}
space:
  lambda.start: {{type: float, low: 0.1, high: 1.0}}
  heads.exits: {{type: subset, choices: [layer1.0, layer2.0]}}
"""


def _server_up() -> bool:
    try:
        sqlalchemy.create_engine(f"{SERVER}/test").connect().close()
        return True
    except sqlalchemy.exc.OperationalError:
        return False


@pytest.fixture
def pg_url():
    if not _server_up():
        pytest.fail(f"PostgreSQL is not reachable at {SERVER} (start it: see README, Tests)")
    name = f"snn_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(f"{SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield f"{SERVER}/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def space_file(tmp_path, epochs=2, study=""):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(epochs=epochs, study=study))
    return path


def worker(space, url, n_trials, *extra):
    cmd = [sys.executable, "search/run.py", "--space", str(space), "--storage", url, "--n-trials", str(n_trials)]
    return subprocess.Popen(cmd + list(extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def trials(url, name="shared"):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def create(space, url):
    """Create storage and study once, before workers start (as run.py does for the first worker)."""
    from search.optuna_backend import create_study
    from search.storage import open_storage

    create_study(load_space(space), open_storage(url, 1))


def test_two_workers_finish_exactly_n_trials(tmp_path, pg_url):
    space = space_file(tmp_path)
    create(space, pg_url)
    procs = [worker(space, pg_url, 6) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    done = trials(pg_url)
    assert len(done) == 6 and sorted(t.number for t in done) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert all("complete value=" in out for out in outputs)  # both workers ran trials


def test_killed_worker_is_failed_and_the_other_finishes(tmp_path, pg_url):
    space = space_file(tmp_path, epochs=3)
    create(space, pg_url)
    victim = worker(space, pg_url, 4)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run") for t in trials(pg_url)
    ):
        time.sleep(0.5)
    survivor = worker(space, pg_url, 4)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out
    states = [t.state for t in trials(pg_url)]
    assert TrialState.RUNNING not in states and len(states) == 4
    assert states.count(TrialState.FAIL) == 1 and "failed stale trials" in out


def test_ray_backend_writes_to_the_study_and_resumes(tmp_path):
    url = f"sqlite:///{tmp_path}/ray.db"
    space = space_file(tmp_path, study=", pruner: successive_halving")
    args = ["--backend", "ray", "--max-concurrent", "2", "--cpus-per-trial", "1"]
    first = worker(space, url, 3, *args)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out
    assert out.count("ray trial") == 3
    done = trials(url)
    assert len(done) == 3 and all(t.user_attrs["backend"] == "ray" for t in done)
    full = [t for t in done if t.state == TrialState.COMPLETE]
    assert full and all(t.user_attrs["epochs_run"] == 2 and "config" in t.user_attrs for t in full)

    # an earlier driver's RUNNING trial is failed; the budget is topped up to 4
    study = optuna.load_study(study_name="shared", storage=url)
    orphan = study.ask()
    orphan.set_user_attr("backend", "ray")
    second = worker(space, url, 5, *args)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    assert f"failed trials left RUNNING by an earlier Ray driver: [{orphan.number}]" in out
    states = [t.state for t in trials(url)]
    assert len(states) == 5 and TrialState.RUNNING not in states


def test_scheduler_stopped_trials_are_pruned_and_never_exported(tmp_path):
    from search.ray_backend import _searcher

    space = load_space(space_file(tmp_path, epochs=3))
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(space, storage)
    study = optuna.load_study(study_name="shared", storage=storage)
    cfg = space.config({}).to_dict()
    for trial_id, epochs_run, acc in (("cut", 1, 0.99), ("full", 3, 0.5)):
        assert "values" in searcher.suggest(trial_id)
        attrs = {"config": cfg, "epochs_run": epochs_run}
        searcher.on_trial_complete(trial_id, {"val_acc": acc, "epochs_run": epochs_run, "epochs_total": 3,
                                              "attrs": json.dumps(attrs)})
    cut, full = study.get_trials()
    assert cut.state == TrialState.PRUNED and cut.user_attrs["truncated"] is True
    assert full.state == TrialState.COMPLETE and full.value == 0.5
    assert study.best_trial.number == full.number and [t.number for t in select(study)] == [full.number]


def test_ray_schedulers_count_epochs_and_wait_min_epochs(tmp_path):
    from search.ray_backend import _scheduler

    spaces = {pruner: load_space(space_file(tmp_path, epochs=6, study=f", pruner: {pruner}, min_epochs: 2"))
              for pruner in ("median", "successive_halving", "hyperband")}
    schedulers = {pruner: _scheduler(space, 6) for pruner, space in spaces.items()}
    for pruner, scheduler in schedulers.items():
        assert scheduler._time_attr == "training_iteration", pruner  # epochs, not seconds
    assert schedulers["median"]._grace_period == 2

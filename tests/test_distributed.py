"""Many workers: PostgreSQL studies shared by processes, and the Ray Tune backend (2 local CPUs)."""

import json
import os
import re
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from search.space import load_space
from search.study import select

from conftest import ROOT, communicate

SPACE = """
study: {{name: shared, seed: 0, pruner: none, heartbeat: 1, control: {control}{study}}}
base:
  data: {{limit: 48, timesteps: 2, batch_size: 16}}
  model: {{width: 4}}
  optim: {{epochs: {epochs}}}
space:
  lambda.start: {{type: float, low: 0.1, high: 1.0}}
  heads.exits: {{type: subset, choices: [layer1.0, layer2.0]}}
"""


def space_file(tmp_path, epochs=2, study="", control="0"):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(epochs=epochs, study=study, control=control))
    return path


def worker(space, url, n_trials, *extra, env=None):
    cmd = [sys.executable, "search/run.py", "--space", str(space), "--storage", url, "--n-trials", str(n_trials)]
    return subprocess.Popen(cmd + list(extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def trials(url, name="shared"):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def distinct_params(done):
    return len({tuple(sorted(t.params.items())) for t in done}) == len(done)


@pytest.mark.long(20)
def test_two_workers_finish_exactly_n_trials_with_distinct_params(tmp_path, pg_url):
    """Two separate processes on one PostgreSQL study, with its control arm: each arm's budget is met
    exactly, the control's single run once."""
    space = space_file(tmp_path, control="false")
    here = "--study-dir", str(tmp_path / "shared")
    first = worker(space, pg_url, 6, *here)  # two independent processes on one study, each its own seed stream
    second = worker(space, pg_url, 6, *here)
    outputs = [communicate(p) for p in (first, second)]
    assert all(p.returncode == 0 for p in (first, second)), outputs
    done = trials(pg_url)
    assert len(done) == 6 and sorted(t.number for t in done) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert [t.state for t in trials(pg_url, "shared.control")] == [TrialState.COMPLETE]
    assert all("complete value=" in out for out in outputs)  # both workers ran trials
    assert distinct_params(done)
    streams = [int(re.search(r"study 'shared': .* sampler seed stream (\d+),", out).group(1)) for out in outputs]
    assert sorted(streams) == [0, 1]  # each its own (its control arm's line may come first)


@pytest.mark.long(70)
def test_ray_backend_writes_to_the_study_and_resumes(tmp_path):
    url = f"sqlite:///{tmp_path}/ray.db"
    space = space_file(tmp_path, epochs=3, study=", pruner: successive_halving")  # 2 epochs after the signal's
    args = ["--backend", "ray", "--max-concurrent", "2", "--cpus-per-trial", "1"]
    first = worker(space, url, 3, *args)
    out = communicate(first)
    assert first.returncode == 0, out
    assert out.count(" done after ") == 3
    done = trials(url)
    assert len(done) == 3 and all(t.user_attrs["backend"] == "ray" for t in done)
    assert distinct_params(done)
    full = [t for t in done if t.state == TrialState.COMPLETE]
    assert full and all(t.user_attrs["epochs_run"] == 3 and "config" in t.user_attrs for t in full)
    assert not any("test" in t.user_attrs for t in done)  # search trials never read the test split
    assert all((tmp_path / "shared" / "trials" / str(t.number) / "model.pt").exists() for t in full)

    # an earlier driver's RUNNING trial is failed and queued again; the budget is topped up to 5
    study = optuna.load_study(study_name="shared", storage=url)
    orphan = study.ask({"lambda.start": optuna.distributions.FloatDistribution(0.1, 1.0)})
    orphan.set_user_attr("backend", "ray")
    # ... and a preemption's SIGTERM to the driver when the first epoch's result reaches it (the test hook
    # SNN_STOP_AT): exit 143; every trial it cut short ends FAIL with its reason and a WAITING copy, which
    # the next run resumes
    second = worker(space, url, 5, *args, env={**os.environ, "SNN_STOP_AT": "result"})
    out = communicate(second)
    assert second.returncode == 143 and "Traceback" not in out and "(core dumped)" not in out, out
    assert f"trials [{orphan.number}] were left RUNNING by an earlier Ray driver" in out
    stopped = [t for t in trials(url) if t.state == TrialState.FAIL and t.number != orphan.number]
    assert TrialState.RUNNING not in [t.state for t in trials(url)]
    assert trials(url)[orphan.number].user_attrs["fail_reason"] == "its Ray driver died; queued again"
    assert stopped and all(t.user_attrs["fail_reason"] == "preempted (SIGTERM); queued again" for t in stopped)
    third = worker(space, url, 5, *args)
    out = communicate(third)
    assert third.returncode == 0, out
    done = trials(url)
    states = [t.state for t in done]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 5
    retry = next(t for t in done if t.system_attrs.get("retry_history") == [orphan.number])
    assert retry.params["lambda.start"] == orphan.params["lambda.start"]


@pytest.mark.long(50)
def test_ray_hyperband_pauses_and_resumes_trials_from_their_checkpoints(tmp_path):
    """HyperBand pauses trials at its milestones and resumes the best later: from the checkpoint Tune
    got after their last epoch, not from epoch 0. The control arm (one run of the base without heads) runs
    on the same Ray, and confirm's retrainings too."""
    url = f"sqlite:///{tmp_path}/ray.db"
    space = space_file(tmp_path, epochs=3, study=", pruner: hyperband", control="false")  # brackets of 1 and 3
    proc = worker(space, url, 6, "--backend", "ray", "--max-concurrent", "2")
    out = communicate(proc)
    assert proc.returncode == 0, out
    (control,) = trials(url, "shared.control")
    assert control.state == TrialState.COMPLETE and control.user_attrs["config"]["heads"]["exits"] == []
    assert control.user_attrs["backend"] == "ray" and f"without={control.value:.4g} (control trial 0)" in out
    confirm = subprocess.run([sys.executable, "-m", "search.cli", "confirm", "--study", "shared", "--storage", url,
                              "--top-k", "1", "--seeds", "1", "--backend", "ray"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert confirm.returncode == 0, confirm.stdout + confirm.stderr
    retrained = trials(url, "shared.confirm")  # the best with heads and the control, at seed 0
    assert [t.state for t in retrained] == [TrialState.COMPLETE] * 2 and all(t.user_attrs["backend"] == "ray"
                                                                            for t in retrained)
    assert all(0 <= t.value <= 1 and t.value == t.user_attrs["test"]["test_acc"] for t in retrained)
    done = trials(url)
    assert len(done) == 6 and distinct_params(done)
    resumed = [t for t in done if any(s > 0 for s in t.user_attrs["starts"])]
    assert resumed, [t.user_attrs.get("starts") for t in done]
    for t in done:
        starts, epochs = t.user_attrs["starts"], [h["epoch_time"] for h in t.user_attrs["history"]]
        assert starts.count(0) == 1 and starts == sorted(starts), starts  # never restarted from scratch
        assert len(epochs) == t.user_attrs["epochs_run"]
    full = [t for t in done if t.state == TrialState.COMPLETE]
    assert full and all(t.user_attrs["epochs_run"] == 3 for t in full)
    assert "trial 0 epoch 1/3 val_acc=" in out  # the workers' epoch lines reach the driver's output


LOST_EXIT = """
import sys, weakref
from search.ray_backend import exit_quietly
if sys.argv[1] == "hooked":
    sys.unraisablehook = exit_quietly
class Model: pass
model = Model()
def finalizer(ref): raise SystemExit(1)  # as Ray's SIGTERM handler does when the signal lands in a finalizer
ref = weakref.ref(model, finalizer)
del model
print("trained on")
"""


@pytest.mark.parametrize("hook", ["hooked", "python's"])
def test_a_sigterm_exit_lost_in_a_finalizer_still_ends_a_ray_actor_without_a_traceback(hook):
    """The race behind a preemption's traceback from a Ray actor (the SIGTERM's SystemExit raised inside a
    weakref callback): Python alone prints it and trains on; an actor's hook ends it quietly, code 1."""
    run = subprocess.run([sys.executable, "-c", LOST_EXIT, hook], cwd=ROOT, capture_output=True, text=True)
    if hook == "hooked":
        assert (run.returncode, run.stdout, run.stderr) == (1, "", "")
    else:
        assert run.returncode == 0 and "trained on" in run.stdout and "Traceback" in run.stderr


def test_scheduler_stopped_trials_are_pruned_and_never_exported(tmp_path):
    from search.ray_backend import _searcher
    from search.study import create_study
    from search.storage import open_storage

    space = load_space(space_file(tmp_path, epochs=3))
    url = f"sqlite:///{tmp_path}/s.db"
    storage = open_storage(url)
    study = create_study(space, storage, tmp_path / "shared")
    searcher = _searcher(space, storage, url, study, tmp_path / "shared")
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


def test_ray_schedulers_count_epochs_and_wait_min_epochs(tmp_path, monkeypatch):
    from ray.tune.schedulers import HyperBandScheduler, TrialScheduler

    from search.pruners import make_scheduler

    spaces = {pruner: load_space(space_file(tmp_path, epochs=6, study=f", pruner: {pruner}, min_epochs: 2"))
              for pruner in ("median", "successive_halving", "hyperband")}
    schedulers = {pruner: make_scheduler(space) for pruner, space in spaces.items()}
    for pruner, scheduler in schedulers.items():
        assert scheduler._time_attr == "training_iteration", pruner  # epochs, not seconds
    assert schedulers["median"]._grace_period == 2
    assert schedulers["successive_halving"]._max_t == 6
    # ASHA's first rung is the grace period, then x3 up to max_t
    assert sorted(m for m, _ in schedulers["successive_halving"]._brackets[0]._rungs) == [2, 6]
    # Tune's HyperBand has no grace period: before min_epochs ours continues without consulting it
    hyperband, seen = schedulers["hyperband"], []
    monkeypatch.setattr(HyperBandScheduler, "on_trial_result",
                        lambda self, controller, trial, result: seen.append(result) or "PAUSE")
    assert hyperband.on_trial_result(None, None, {"training_iteration": 1}) == TrialScheduler.CONTINUE
    assert hyperband.on_trial_result(None, None, {"training_iteration": 2}) == "PAUSE"
    assert seen == [{"training_iteration": 2}]


@pytest.mark.long(40)
def test_one_trial_ends_the_same_through_both_backends(tmp_path):
    """Both backends run a trial through search.trial.run_trial and end it in search.trial.finish: the
    stored trials agree in state, values, params, attrs and kept files (one thread each, same numerics)."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(epochs=2, study="", control=0).replace("model: {width: 4}", "model: {width: 4}\n  heads: "
                     "{exits: [layer1.0]}").replace("lambda.start: {type: float, low: 0.1, high: 1.0}",
                     "lambda.start: {type: categorical, choices: [0.5]}").split("  heads.exits:")[0])
    stored = {}
    for backend in ("optuna", "ray"):
        url, root = f"sqlite:///{tmp_path}/{backend}.db", tmp_path / backend
        cmd = [sys.executable, "search/run.py", "--space", str(space), "--storage", url, "--n-trials", "1",
               "--backend", backend, "--study-dir", str(root)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (trial,) = trials(url)
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=optuna.storages.get_storage(url))
        kept = sorted(m.filename for m in metas)
        assert all((root / "artifacts" / m.artifact_id).is_file() for m in metas)
        stored[backend] = trial, kept, sorted(p.name for p in (root / "trials" / "0").iterdir())
    (a, kept_a, files_a), (b, kept_b, files_b) = stored["optuna"], stored["ray"]
    assert a.state == b.state == TrialState.COMPLETE and a.params == b.params
    assert kept_a == kept_b == ["config.yaml", "model.pt"] and files_a == files_b == ["config.yaml", "model.pt"]
    assert "fail_reason" not in a.user_attrs and "fail_reason" not in b.user_attrs
    own = {"worker", "backend"}  # who ran it: the Optuna worker's host:pid, or "ray"
    assert set(a.user_attrs) - own == set(b.user_attrs) - own
    for key in ("config", "epochs_run", "starts"):
        assert a.user_attrs[key] == b.user_attrs[key], key
    for ra, rb in zip(a.user_attrs["history"], b.user_attrs["history"], strict=True):
        for metric in ("train_loss", "val_acc", "val_loss", "lambda", "lr"):
            assert abs(ra[metric] - rb[metric]) <= 1e-6 * max(1.0, abs(ra[metric])), (metric, ra, rb)
    assert a.values == pytest.approx(b.values, rel=1e-6)
    assert list(a.intermediate_values) == list(b.intermediate_values) == [1, 2]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 as a server on loopback, so that separate worker processes share one bucket; the
    environment points boto3 (here and in the workers) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="snn")
    yield s3
    server.stop()


@pytest.mark.long(35)
def test_a_retry_on_another_machine_resumes_from_the_artifact_store(tmp_path, pg_url, s3_server):
    """Two "machines" share a PostgreSQL study and an S3 bucket, not a folder: worker A uploads last.pt
    after every epoch (study.checkpoint_every: 1) and is SIGKILLed mid-trial; worker B, in a study folder
    of its own, judges A's trial stale and resumes the copy from A's last upload, like an unbroken run."""
    from trainer.config import build
    from trainer.fit import fit

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(epochs=6, study=", artifacts: s3://snn, checkpoint_every: 1", control=0).replace(
        "limit: 48", "limit: 256"))  # ~0.5 s per epoch
    cmd = [sys.executable, "search/run.py", "--space", str(space), "--storage", pg_url, "--n-trials", "1"]
    a = subprocess.Popen(cmd + ["--study-dir", str(tmp_path / "a")], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    try:
        while not any(t.user_attrs.get("resume_state", {}).get("epochs", 0) >= 2 for t in _maybe_trials(pg_url)):
            assert time.time() < deadline and a.poll() is None
            time.sleep(0.2)
    finally:
        a.kill()
    communicate(a)
    (killed,) = trials(pg_url)
    uploaded = killed.user_attrs["resume_state"]["epochs"]
    assert killed.state == TrialState.RUNNING and uploaded >= 2

    b = subprocess.run(cmd + ["--study-dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert b.returncode == 0, b.stdout + b.stderr
    first, retry = trials(pg_url)
    assert first.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params and retry.user_attrs["starts"] == [0, uploaded]
    assert f"trial 1 resumes after epoch {uploaded}/6" in b.stdout
    unbroken = fit(build(retry.user_attrs["config"]), test=False)
    assert [h["val_acc"] for h in retry.user_attrs["history"]] == [r.metrics["val_acc"] for r in unbroken.history]
    assert not (tmp_path / "b" / "trials" / "0").exists()  # B never saw A's folder
    # what stays in the bucket: the completed trial's model.pt and config.yaml; the resume states are dropped
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="snn")["Contents"]]
    assert len(keys) == 2 and not any(k.startswith("resume-") for k in keys), keys


def _maybe_trials(url):
    try:
        return trials(url)
    except KeyError:  # the study is not created yet
        return []


def _node_of(pid, nodes):
    """The cluster node a process runs under (its own or an ancestor's command line, the raylet's or the
    worker's, names the node's id), or None for a process of another Ray."""
    import psutil

    chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
    named = " ".join(" ".join(p.cmdline()) for p in chain)
    return next((n for n in nodes if f"--node_id={n.node_id}" in named or f"--node-id={n.node_id}" in named), None)


@pytest.mark.long(70)
def test_a_ray_trial_continues_on_another_node_when_its_node_is_removed(tmp_path):
    """A Ray cluster on this machine the way Ray's own tests build one (ray.cluster_utils.Cluster: a head
    without CPUs, two worker nodes of one CPU): the search joins it with --address; the node the first
    trial runs on is removed mid-trial; Tune restarts that trial on the other node from its last
    checkpoint, and the study ends with exactly n trials. The data is MNIST at the relative default
    data.root, as a real cluster's would be: the nodes, started without this project's environment, must
    not move the trials into Tune's folders."""
    from ray.cluster_utils import Cluster

    from test_data import write_mnist
    from trainer.checkpoint import load_history

    write_mnist(tmp_path / "data", train=160, test=20)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        url = f"sqlite:///{tmp_path}/ray.db"
        space = tmp_path / "space.yaml"
        space.write_text(SPACE.format(epochs=6, study="", control=0).replace("limit: 48", "name: mnist, limit: 128"))
        cmd = [sys.executable, str(ROOT / "search" / "run.py"), "--space", str(space), "--storage", url, "--n-trials",
               "2", "--backend", "ray", "--address", cluster.address, "--max-concurrent", "1"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        trial_dir, deadline = tmp_path / "shared" / "trials" / "0", time.time() + 300
        try:
            while len(load_history(trial_dir) if (trial_dir / "last.pt").exists() else []) < 2:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
            actors = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout
            (node,) = {n for pid in actors.split() if (n := _node_of(int(pid), nodes))}  # one trial at a time
            cluster.remove_node(node, allow_graceful=False)
        finally:
            out = communicate(proc)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, out
    done = trials(url)
    assert len(done) == 2 and all(t.state == TrialState.COMPLETE for t in done) and distinct_params(done)
    moved = done[0].user_attrs
    assert moved["starts"][0] == 0 and len(moved["starts"]) == 2 and moved["starts"][1] >= 1, moved["starts"]
    assert len(moved["history"]) == moved["epochs_run"] == 6
    assert done[1].user_attrs["starts"] == [0]

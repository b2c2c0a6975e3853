"""Durable searches: killed and interrupted workers lose nothing and repeat nothing; trial errors fail
the trial, not the worker; many workers share one study on every storage."""

import io
import logging
import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.artifacts import FileSystemArtifactStore
import pytest
import torch
from optuna.trial import TrialState

from search import run as run_cli
from search.budget import Heartbeat
from search.progress import EpochProgress
from search.samplers import make_sampler
from search.space import load_space
from search.storage import open_storage, timeouts
from search.trial import finish, run_trial
from trainer.config import build
from trainer.fit import EpochReport, fit

from conftest import ROOT, communicate

SPACE = """
study: {{name: durable, seed: 0, pruner: none, heartbeat: 1, baseline: false{study}}}
base:
  data: {{timesteps: 2, batch_size: 32{data}}}
  model: {{width: 4}}
  heads: {{exits: [layer1.0]}}
  optim: {{name: adamw, lr: 0.005, epochs: {epochs}}}
space:
{space}
"""
LAMBDA = "  lambda.start: {type: float, low: 0.1, high: 1.0}\n  lambda.schedule: {type: categorical, choices: [linear, cosine]}"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def space_file(tmp_path, epochs=2, study="", data=", limit: 64", space=LAMBDA):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(epochs=epochs, study=study, data=data, space=space))
    return path


def command(space, url, n_trials, *extra):
    return [sys.executable, "search/run.py", "--space", str(space), "--storage", url, "--n-trials", str(n_trials),
            *extra]


def trials(url):
    return optuna.load_study(study_name="durable", storage=open_storage(url)).get_trials()


def wait_for(url, ready, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if ready(trials(url)):
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def storage_url(kind, tmp_path, request):
    if kind == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path}/d.db" if kind == "sqlite" else f"journal:{tmp_path}/d.log"


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_killed_worker_trial_is_retried_and_resumes_like_an_unbroken_run(tmp_path, kind, request):
    url = storage_url(kind, tmp_path, request)
    space = space_file(tmp_path, epochs=5, data=", limit: 256")  # ~0.5 s per epoch
    cmd = command(space, url, 1, "--study-dir", str(tmp_path / "durable"))
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(url, lambda ts: any(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 2
                                     for t in ts))
    finally:
        victim.kill()  # SIGKILL: no handler runs, the trial stays RUNNING with its last.pt
    out = victim.communicate()[0]
    assert "trial 0 epoch 2/5 val_acc=" in out and "s/epoch ETA" in out  # a line per epoch off a terminal
    killed = trials(url)[0]
    assert killed.state == TrialState.RUNNING and (tmp_path / "durable" / "trials" / "0" / "last.pt").exists()

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "trials [0] stopped beating (their worker died): failed, and queued again" in resumed.stdout
    done = trials(url)
    states = [t.state for t in done]
    assert sum(s in DONE for s in states) == 1 and TrialState.RUNNING not in states  # the retry was free
    assert states.count(TrialState.FAIL) == 1 and TrialState.WAITING not in states
    retry = next(t for t in done if t.system_attrs.get("retry_history") == [0])
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    first = retry.user_attrs["starts"][-1]
    assert retry.user_attrs["starts"] == [0, first] and first >= 2 and f"trial {retry.number} resumes after epoch {first}/5" in resumed.stdout

    unbroken = fit(build(retry.user_attrs["config"]), test=False)
    assert [h["val_acc"] for h in retry.user_attrs["history"]] == [r.metrics["val_acc"] for r in unbroken.history]
    trial_dirs = tmp_path / "durable" / "trials"
    assert not any((trial_dirs / "0").glob("*.pt"))  # the dead trial's checkpoints moved to its retry
    assert sorted(p.name for p in (trial_dirs / str(retry.number)).iterdir()) == ["config.yaml", "model.pt"]


def test_ctrl_c_queues_the_running_trials_of_every_worker_again(tmp_path):
    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=8, data=", limit: 256")  # epochs enough that both still run at the signal
    parent = subprocess.Popen(command(space, url, 3, "--workers", "2"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(url, lambda ts: sum(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1
                                     for t in ts) == 2)
    finally:
        os.killpg(parent.pid, signal.SIGINT)  # as a terminal's Ctrl-C does; the parent stops its workers
    out = communicate(parent, 120)
    assert parent.returncode == 130, out
    interrupted = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all("interrupted" in t.user_attrs["fail_reason"] for t in interrupted)
    assert sum(t.state == TrialState.WAITING for t in trials(url)) == 2
    assert "w0 trial" in out and "w1 trial" in out

    again = subprocess.run(command(space, url, 3, "--workers", "2"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    done = trials(url)
    assert sum(t.state in DONE for t in done) == 3 and not any(t.state == TrialState.RUNNING for t in done)
    retries = [t for t in done if t.system_attrs.get("retry_history")]
    assert len(retries) == 2
    # each retry resumes after the epochs its original finished (a worker may have moved on to the third
    # trial between the poll and the signal, so one original may have been in its first epoch)
    originals = {t.number: t for t in interrupted}
    assert all(t.user_attrs["starts"][-1] == originals[t.system_attrs["retry_history"][0]].user_attrs.get(
        "epochs_run", 0) for t in retries)
    assert any(t.user_attrs["starts"][-1] >= 1 for t in retries)
    assert "fail_reason" not in retries[0].user_attrs  # the retry does not inherit the interruption
    assert len({tuple(sorted(t.params.items())) for t in done if t.state in DONE}) == 3


def test_two_workers_on_a_journal_file_never_wait_for_a_lock(tmp_path):
    url = f"journal:{tmp_path}/d.log"
    space = space_file(tmp_path, epochs=1)
    proc = subprocess.run(command(space, url, 8, "--workers", "2"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = trials(url)
    assert len(done) == 8 and all(t.state == TrialState.COMPLETE for t in done)
    assert len({tuple(sorted(t.params.items())) for t in done}) == 8  # no two workers drew the same trial
    assert "lock" not in (proc.stdout + proc.stderr).lower()  # Optuna warns when it breaks a stale lock
    by_worker = {}
    for t in sorted(done, key=lambda t: t.datetime_start):
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    assert len(by_worker) == 2
    # from one trial's end to the same worker's next start: the loop and its ask (a worker that started late
    # may have run a single trial, so the gaps are pooled over both)
    gaps = [(b.datetime_start - a.datetime_complete).total_seconds()
            for runs in by_worker.values() for a, b in zip(runs, runs[1:])]
    assert len(gaps) == 6 and max(gaps) < 1.0, gaps
    assert (tmp_path / "d.log.budget.lock").exists()


def test_trial_errors_fail_the_trial_and_the_grid_ends_cleanly(tmp_path, capsys):
    """MNIST is not on disk: its trials fail with the data error, digits trials complete, and the
    grid sampler stops the run once every point ran, though the budget allows more."""
    url = f"sqlite:///{tmp_path}/d.db"
    grid = "  data.name: {type: categorical, choices: [mnist, digits]}\n  lambda.start: {type: float, low: 0.5, high: 1.0, step: 0.5}"
    space = space_file(tmp_path, data=f", limit: 64, root: {tmp_path}/nothing", space=grid,
                       study=", sampler: grid")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "10"]) == 0
    out = capsys.readouterr().out
    assert "grid exhausted" in out
    done = trials(url)
    assert len(done) == 4
    failed = [t for t in done if t.state == TrialState.FAIL]
    assert {t.params["data.name"] for t in failed} == {"mnist"} and len(failed) == 2
    assert all(t.user_attrs["fail_reason"].startswith("DataNotFoundError: mnist not found under") for t in failed)
    assert "Traceback" in (tmp_path / "durable" / "trials" / str(failed[0].number) / "error.txt").read_text()
    assert all(t.state == TrialState.COMPLETE for t in done if t.params["data.name"] == "digits")


def test_out_of_memory_fails_the_trial_and_drops_its_checkpoints(tmp_path, monkeypatch):
    space = load_space(space_file(tmp_path, epochs=3))

    def fit_then_oom(cfg, callback, test):
        fit(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 1})}), callback, test=test)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    monkeypatch.setattr("search.trial.fit", fit_then_oom)
    seen = []
    outcome = run_trial(space, 7, {"lambda.start": 0.5}, tmp_path / "t7", [], lambda r, e, restored: seen.append(e),
                        EpochProgress(out=io.StringIO()))
    assert outcome.state == TrialState.FAIL and len(seen) == 1
    assert outcome.fail_reason == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    study = optuna.create_study()
    ended = finish(study, study.ask(), outcome, tmp_path / "t7", FileSystemArtifactStore(str(tmp_path)))
    assert ended.state == TrialState.FAIL and ended.user_attrs["fail_reason"] == outcome.fail_reason
    assert sorted(p.name for p in (tmp_path / "t7").iterdir()) == ["config.yaml", "error.txt"]
    assert outcome.attrs["config"]["lambda"]["start"] == 0.5


@pytest.mark.parametrize("url,message", [
    ("postgresql://postgres@127.0.0.1:1/none", "storage postgresql://postgres@127.0.0.1:1/none: cannot open"),
    ("mysql+nodriver://x/y", "storage mysql+nodriver://x/y: cannot open"),
    ("::not a url::", "not an SQLAlchemy URL or a journal file"),
])
def test_bad_storage_is_one_line_exit_2(tmp_path, capsys, url, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "studies").exists()  # nothing written for a storage that never opened


def test_unreadable_space_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_bytes(b"study: \xff\xfe\n")
    assert run_cli.main(["--space", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: cannot read") and err.count("\n") == 1
    assert run_cli.main(["--space", str(tmp_path)]) == 2  # a folder
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: cannot read")


def test_a_head_exit_that_one_sampled_architecture_lacks_is_caught_before_the_study(tmp_path, capsys):
    space = space_file(tmp_path, space="  model.arch: {type: categorical, choices: [resnet20, resnet19]}\n"
                       "  heads.exits: {type: subset, choices: [layer1.0, layer3.2]}")
    assert run_cli.main(["--space", str(space), "--storage", f"sqlite:///{tmp_path}/d.db"]) == 2
    err = capsys.readouterr().err
    assert "bad value for 'heads.exits': resnet19 has no module 'layer3.2'" in err
    assert not (tmp_path / "d.db").exists()  # nothing touched


def test_each_worker_draws_its_own_trials_and_tpe_lies_about_running_ones(tmp_path):
    space = load_space(space_file(tmp_path))

    def first_params(worker):
        study = optuna.create_study(sampler=make_sampler(space, worker), direction="maximize")
        return study.ask().suggest_float("x", 0, 1)

    assert first_params(0) == first_params(0) and first_params(0) != first_params(1)
    assert make_sampler(space, 0)._constant_liar


def test_a_failed_heartbeat_is_retried_not_fatal(caplog):
    class Flaky:
        calls = 0

        def record_heartbeat(self, trial_id):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise OSError("database is locked")

        def get_heartbeat_interval(self):
            return 0.05

    storage = Flaky()
    with caplog.at_level(logging.WARNING, logger="search"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr("search.budget.heartbeat_enabled", lambda s: True)
        with Heartbeat(storage, 1, 4):
            time.sleep(0.5)
    assert Flaky.calls >= 5  # it kept beating after the failure
    assert "heartbeat of trial 4 failed (OSError: database is locked); retrying" in caplog.text


@pytest.mark.parametrize("heartbeat", [1, 10, 60])
def test_grace_period_outlasts_every_storage_timeout(tmp_path, heartbeat):
    storage_timeout, grace = timeouts(heartbeat)
    assert grace > storage_timeout and grace >= 2 * heartbeat
    storage = open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat)
    assert storage.engine.dialect.name == "sqlite" and storage.grace_period == grace
    assert storage.engine_kwargs["connect_args"]["timeout"] == storage_timeout


def test_progress_is_a_tqdm_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, err = Terminal(), io.StringIO()
    progress = EpochProgress("w1 ", out=out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", err)
        progress.start(3, 10, 4)
        progress.epoch(EpochReport(4, {"val_acc": 0.8125, "lambda": 0.25}))
        progress.close()
    assert out.getvalue() == ""  # no plain lines
    assert "w1 trial 3" in err.getvalue() and "5/10" in err.getvalue() and "val_acc=0.812" in err.getvalue()


def test_a_new_trial_never_resumes_from_files_of_an_earlier_study_of_the_same_name(tmp_path):
    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=2)
    stale = tmp_path / "durable" / "trials" / "0"
    fit(load_space(space).config({}).model_copy(update={"run": build({"run": {"out_dir": str(stale)}}).run}),
        lambda report: True)  # a run stopped after one epoch leaves last.pt (say the old study.db was deleted)
    assert (stale / "last.pt").exists()
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "1"]) == 0
    trial = trials(url)[0]
    assert trial.user_attrs["starts"] == [0] and len(trial.user_attrs["history"]) == 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the stand-in other worker asks directly
def test_a_worker_with_nothing_left_exits_a_poll_after_the_others_trials_end(tmp_path, monkeypatch):
    """It waits for the other workers' running trials (to resume them should their worker die), but looks
    every POLL seconds, not every heartbeat: at the end of ``make run`` it used to idle up to 10 s."""
    from search import optuna_backend

    url = f"sqlite:///{tmp_path}/d.db"
    space = load_space(space_file(tmp_path, study=", heartbeat: 10, n_trials: 1"), [], None)
    storage = open_storage(url, space.study.heartbeat, space.study.max_retry)
    worker = optuna_backend.Worker(space, storage, url, tmp_path / "durable")
    other = worker.study.ask()  # another worker's trial, running: it fills the budget of 1
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        worker.study.tell(other, 0.5)  # the other worker finishes while this one waits

    monkeypatch.setattr(optuna_backend.time, "sleep", sleep)
    worker.run(timeout=None)
    assert sleeps == [optuna_backend.POLL] and optuna_backend.POLL < space.study.heartbeat
    assert [t.state for t in worker.study.get_trials()] == [TrialState.COMPLETE]

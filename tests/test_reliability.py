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
from trainer.files import WriteError
from trainer.fit import EpochReport, fit

from conftest import ROOT, communicate

SPACE = """
study: {{name: durable, seed: 0, pruner: none, heartbeat: 1, control: {control}{study}}}
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


def space_file(tmp_path, epochs=2, study="", data=", limit: 64", space=LAMBDA, control="0"):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(epochs=epochs, study=study, data=data, space=space, control=control))
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


def running(pid):
    """Whether ``pid`` is a live process: gone, or a zombie that its new parent has yet to reap, is not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def storage_url(kind, tmp_path, request):
    if kind == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path}/d.db" if kind == "sqlite" else f"journal:{tmp_path}/d.log"


@pytest.mark.long(40)
@pytest.mark.parametrize("kind,sig", [("postgresql", "SIGKILL"), ("sqlite", "SIGTERM")])
def test_killed_worker_trial_is_retried_and_resumes_like_an_unbroken_run(tmp_path, kind, sig, request):
    """SIGKILL: no handler runs, the trial stays RUNNING with its last.pt until its heartbeat goes stale.
    SIGTERM (a preemption): the worker queues it again at once and exits 143. SQLite and PostgreSQL judge
    staleness with the same RDB heartbeats, and the journal file with its own, which test_units.py and
    test_a_trial_that_never_beat_is_judged_stale_and_used_up_retries_say_so test on each storage."""
    url = storage_url(kind, tmp_path, request)
    space = space_file(tmp_path, epochs=5, data=", limit: 256")  # ~0.5 s per epoch
    cmd = command(space, url, 1, "--study-dir", str(tmp_path / "durable"))
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(url, lambda ts: any(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 2
                                     for t in ts))
    finally:
        victim.send_signal(getattr(signal, sig))
    started = time.time()
    out = victim.communicate()[0]
    assert "trial 0 epoch 2/5 val_acc=" in out and "s/epoch ETA" in out  # a line per epoch off a terminal
    killed = trials(url)[0]
    assert (tmp_path / "durable" / "trials" / "0" / "last.pt").exists()
    if sig == "SIGTERM":
        assert victim.returncode == 143 and time.time() - started < 10, out
        assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == "preempted (SIGTERM); queued again"
        assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.WAITING]  # no stale wait needed
    else:
        assert killed.state == TrialState.RUNNING

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    if sig == "SIGKILL":
        assert "trials [0] stopped beating (their worker died): failed, and queued again" in resumed.stdout
        assert trials(url)[0].user_attrs["fail_reason"].startswith("its worker stopped beating")
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


@pytest.mark.parametrize("sig", [pytest.param("SIGTERM", marks=pytest.mark.long(50)),
                                 pytest.param("SIGINT", marks=pytest.mark.long(25)),
                                 pytest.param("SIGKILL", marks=pytest.mark.long(25))])
def test_ctrl_c_and_sigterm_queue_the_running_trials_of_every_worker_again(tmp_path, sig):
    """Ctrl-C reaches the terminal's process group; a preemption's SIGTERM reaches the parent alone, which
    passes its stop to its workers (each in its own session) and waits for them; a SIGKILLed parent (a
    scheduler's kill, the OOM killer) leaves no worker training: each sees its parent gone. Either way both
    running trials are failed and queued again; after the SIGTERM, the same command resumes them."""
    url = f"sqlite:///{tmp_path}/d.db"
    # epochs long enough that both still run at the signal: after a slow first epoch the rest are fast, and
    # at 128 images the window in which both had finished one closed within 2 s of the test's polls
    space = space_file(tmp_path, epochs=8, data=", limit: 256")
    parent = subprocess.Popen(command(space, url, 3, "--workers", "2"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal,
    # though pytest itself runs in the background (where a shell starts its jobs with SIGINT ignored)
    try:
        wait_for(url, lambda ts: sum(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1
                                     for t in ts) == 2)
    finally:
        if sig == "SIGINT":
            os.killpg(parent.pid, signal.SIGINT)  # as a terminal's Ctrl-C does; the parent stops its workers
        else:
            parent.send_signal(getattr(signal, sig))
    out = communicate(parent, 120)  # the workers hold its output too: it ends when they have
    assert parent.returncode == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}[sig], out
    pids = [int(p) for p in out.split("(pids ")[1].split(")")[0].split(", ")]
    deadline = time.time() + 10
    while any(running(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(p) for p in pids), pids  # no worker left behind
    why = {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "preempted (SIGTERM)", "SIGKILL": "hung up (SIGHUP"}[sig]
    interrupted = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all(why in t.user_attrs["fail_reason"] for t in interrupted)
    assert sum(t.state == TrialState.WAITING for t in trials(url)) == 2
    assert TrialState.RUNNING not in [t.state for t in trials(url)]
    assert "w0 trial" in out and "w1 trial" in out and "Traceback" not in out
    if sig != "SIGTERM":  # each signal leaves the same state behind; running the command again is tested once
        return

    again = subprocess.run(command(space, url, 3, "--workers", "2"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    done = trials(url)
    assert sum(t.state in DONE for t in done) == 3 and not any(t.state == TrialState.RUNNING for t in done)
    retries = [t for t in done if t.system_attrs.get("retry_history")]
    assert len(retries) == 2
    # each retry resumes after the epochs its original finished (a worker may have moved on to the third
    # trial between the poll and the signal, so one original may have been in its first epoch). last.pt is
    # written before the epoch is reported, so a signal between the two leaves the stored epochs_run one
    # behind the checkpoint the retry resumes from: never ahead of it, never more than one behind.
    originals = {t.number: t for t in interrupted}
    for t in retries:
        recorded = originals[t.system_attrs["retry_history"][0]].user_attrs.get("epochs_run", 0)
        assert recorded <= t.user_attrs["starts"][-1] <= recorded + 1, (recorded, t.user_attrs["starts"])
    assert any(t.user_attrs["starts"][-1] >= 1 for t in retries)
    assert "fail_reason" not in retries[0].user_attrs  # the retry does not inherit the interruption
    assert len({tuple(sorted(t.params.items())) for t in done if t.state in DONE}) == 3


@pytest.mark.long(30)
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


@pytest.mark.long(70)
def test_held_load_four_workers_and_four_separate_processes_on_sqlite(tmp_path):
    """Held load on one SQLite file: ``--workers 4``, and four separate processes started within a second
    on a new study (they race to create it): each study ends with exactly n trials, no two alike, none
    RUNNING or WAITING, and no worker met "database is locked"."""
    space = space_file(tmp_path, epochs=1, data=", limit: 32")
    parent = subprocess.Popen(command(space, f"sqlite:///{tmp_path}/a.db", 8, "--workers", "4"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [communicate(parent)]
    separate = [subprocess.Popen(command(space, f"sqlite:///{tmp_path}/b.db", 8), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs += [communicate(p) for p in separate]
    assert all(p.returncode == 0 for p in [parent, *separate]), outputs
    for db in ("a", "b"):
        done = trials(f"sqlite:///{tmp_path}/{db}.db")
        assert len(done) == 8 and all(t.state == TrialState.COMPLETE for t in done), db
        assert len({tuple(sorted(t.params.items())) for t in done}) == 8, db
        assert len({t.user_attrs["worker"] for t in done}) >= 2, db  # the load was shared
    assert not any("locked" in out.lower() or "Traceback" in out for out in outputs), outputs


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
    worker = optuna_backend.Worker([space], storage, url, tmp_path / "durable")
    study = worker.arms[0].study
    other = study.ask()  # another worker's trial, running: it fills the budget of 1
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        study.tell(other, 0.5)  # the other worker finishes while this one waits

    monkeypatch.setattr(optuna_backend.time, "sleep", sleep)
    worker.run(timeout=None)
    assert sleeps == [optuna_backend.POLL] and optuna_backend.POLL < space.study.heartbeat
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


class Pwned:
    """A pickle that would write a file when loaded: what a forged last.pt in a shared folder holds."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("damage", ["forged", "truncated", "garbage"])
def test_a_resume_state_that_cannot_be_read_restarts_the_trial_from_epoch_0(tmp_path, damage):
    """A forged last.pt is refused unread (weights_only=True: its code never runs), a truncated or garbage one
    too; the retry keeps its params and trains from epoch 0, with a warning, instead of failing for good."""
    import pickle

    space = load_space(space_file(tmp_path, epochs=2))
    earlier = tmp_path / "t0"
    out = run_trial(space, 0, {"lambda.start": 0.5}, earlier, [], lambda r, e, restored: None,
                    EpochProgress(out=io.StringIO()))
    assert out.state == TrialState.COMPLETE
    state = earlier / "last.pt"
    fit(space.config({"lambda.start": 0.5}).model_copy(update={"run": build({"run": {"out_dir": str(earlier)}}).run}),
        lambda report: True, test=False)  # leaves a last.pt after epoch 1, as a killed worker does
    pwned = tmp_path / "pwned"
    if damage == "forged":
        state.write_bytes(pickle.dumps({"net": Pwned(pwned)}))
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        state.write_bytes(os.urandom(4096))
    log = io.StringIO()
    seen = []
    retry = run_trial(space, 1, {"lambda.start": 0.5}, tmp_path / "t1", [earlier],
                      lambda r, e, restored: seen.append((e.epoch, restored)), EpochProgress(out=log), starts=[0])
    assert retry.state == TrialState.COMPLETE and seen == [(0, False), (1, False)]  # from epoch 0, nothing restored
    assert retry.attrs["starts"] == [0, 0] and retry.attrs["config"]["lambda"]["start"] == 0.5
    assert "last.pt: not a resume state" in log.getvalue() and "starting again from epoch 0" in log.getvalue()
    assert (tmp_path / "t1" / "last.pt.unreadable").exists() and not pwned.exists()  # never executed
    # the trainer's own resume says so in one line
    from trainer.__main__ import main

    (tmp_path / "t1" / "last.pt.unreadable").replace(tmp_path / "t1" / "last.pt")
    assert main(["--set", f"run.out_dir={tmp_path / 't1'}", "--set", "run.resume=true",
                 "--set", "data.limit=32"]) == 2
    assert not pwned.exists()


def test_a_full_disk_queues_the_trial_again_and_the_worker_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a checkpoint: the trial fails with a one-line reason naming the file, a copy is
    queued (it is not the config's fault), nothing stays RUNNING, and the worker stops with exit 2 instead of
    burning the budget; once there is room the same command resumes from the last epoch written."""
    import errno

    import trainer.checkpoint as checkpoint

    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=3)
    real, calls = checkpoint._atomic_save, []

    def full_after_two(obj, path):
        calls.append(path)
        if len(calls) > 2:  # epoch 1's model.pt and last.pt fit; then the disk is full
            raise WriteError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "_atomic_save", full_after_two)
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full: cannot write" in err and "model.pt: No space left on device" in err
    first, copy = trials(url)
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"].startswith("disk full: cannot write ")
    assert copy.state == TrialState.WAITING
    monkeypatch.setattr(checkpoint, "_atomic_save", real)  # room again
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 0
    done = trials(url)
    assert [t.state for t in done].count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in [t.state for t in done]
    assert done[1].user_attrs["starts"] == [0, 1]  # resumed after the epoch that was written


@pytest.mark.waits  # for a heartbeat to go stale
def test_a_storage_that_cannot_be_written_is_one_line_and_the_trial_is_retried(tmp_path, capsys, monkeypatch):
    """The SQLite file's disk is full at the tell: one line, exit 2; the trial stays RUNNING with no beat and
    the next run judges it stale and retries it."""
    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=1)
    real = optuna.Study.tell

    def full(self, *args, **kwargs):  # as Optuna's RDB storage wraps a failed commit
        import sqlite3

        from sqlalchemy.exc import OperationalError

        try:
            raise OperationalError("UPDATE trials ...", {}, sqlite3.OperationalError("database or disk is full"))
        except OperationalError as err:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit. This typically happens due to invalid data in the "
                "commit, e.g. exceeding max length. ") from err

    monkeypatch.setattr(optuna.Study, "tell", full)
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"storage {url}: cannot write (database or disk is full)" in err
    assert "max length" not in err  # the real cause, not Optuna's guess
    assert "trial 0 stays RUNNING" in err and [t.state for t in trials(url)] == [TrialState.RUNNING]
    monkeypatch.setattr(optuna.Study, "tell", real)
    time.sleep(timeouts(1)[1] + 0.5)  # its heartbeat goes stale
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "1"]) == 0
    assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.waits  # for a heartbeat to go stale
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trial_that_never_beat_is_judged_stale_and_used_up_retries_say_so(tmp_path, kind, capsys):
    """A RUNNING trial with no heartbeat at all (its worker died between ask and first beat) is stale once the
    grace period has passed since it started; when its retries are used up, its fail_reason and the log say
    so and its checkpoints are dropped."""
    from search.storage import fail_stale

    url = f"sqlite:///{tmp_path}/d.db" if kind == "sqlite" else f"journal:{tmp_path}/d.log"
    storage = open_storage(url, heartbeat=1, max_retry=1)
    for attr in ("grace", "grace_period"):  # judge after 1 s, not the default 6
        if hasattr(storage, attr):
            setattr(storage, attr, 1)
    study = optuna.create_study(study_name="durable", storage=storage)
    study.ask()  # RUNNING, never beats
    assert fail_stale(study) == ([], [])
    time.sleep(1.5)
    assert fail_stale(study) == ([0], [])
    first, copy = study.get_trials()
    assert first.state == TrialState.FAIL and "queued again" in first.user_attrs["fail_reason"]
    assert copy.state == TrialState.WAITING
    study.ask()  # the copy runs, and its worker dies too
    time.sleep(1.5)
    assert fail_stale(study) == ([], [1])
    assert study.get_trials()[1].user_attrs["fail_reason"] == (
        "its worker stopped beating; retries used up (study.max_retry=1)")
    assert len(study.get_trials()) == 2  # no third copy


@pytest.mark.waits  # for a heartbeat to go stale
def test_a_worker_drops_the_checkpoints_of_a_trial_whose_retries_are_used_up(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=1, study=", max_retry: 0")
    storage = open_storage(url, heartbeat=1, max_retry=0)
    from search.study import create_study

    study = create_study(load_space(space), storage, tmp_path / "durable")
    dead = study.ask()
    folder = tmp_path / "durable" / "trials" / str(dead.number)
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"x")
    (folder / "model.pt").write_bytes(b"x")
    time.sleep(timeouts(1)[1] + 0.5)
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2",
                         "--study-dir", str(tmp_path / "durable")]) == 0
    out = capsys.readouterr().out
    assert "trials [0] stopped beating (their worker died) and used up their retries (study.max_retry=0)" in out
    assert not (folder / "last.pt").exists() and not (folder / "model.pt").exists()
    assert "queued again" not in out


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)])
        + "\nstudy: {name: b, n_trials: *a8}\nspace: {lambda.start: {type: float, low: 0.1, high: 1}}\n"),
     "expands to more than 100000 values (nested YAML aliases?)"),
    (lambda p: p.write_text("#" * (2 << 20)), "bytes; a config or space file is at most 1048576"),
    (lambda p: os.mkfifo(p), "cannot read (not a regular file: a directory, FIFO or device)"),
    (lambda p: p.write_text("study: {name: i}\nspace: {optim.lr: {type: float, low: 0.001, high: .inf}}\n"),
     "'space.optim.lr.high': must be a finite number (got inf)"),
    (lambda p: p.write_text("study: {name: i}\nspace: {data.timesteps: {type: int, low: .nan, high: 4}}\n"),
     "'space.data.timesteps.low'"),
])
def test_bad_space_files_are_one_line_in_bounded_time_and_memory(tmp_path, capsys, make, message):
    import resource

    path = tmp_path / "space.yaml"
    make(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.time()
    assert run_cli.main(["--space", str(path), "--storage", f"sqlite:///{tmp_path}/d.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert time.time() - started < 5 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert not (tmp_path / "d.db").exists()
    assert run_cli.main(["--space", "/dev/zero"]) == 2 and "not a regular file" in capsys.readouterr().err

"""Preemption at any instant loses nothing: a stop signal is a flag that the search checks at safe points,
so a trial always ends through its one ending path, never halfway through a storage write; and the
processes of a search live and die together."""

import errno
import os
import signal
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from search import run as run_cli
from search import retrain
from trainer import stop
from trainer.config import build
from trainer.fit import fit

from conftest import ROOT, communicate
from test_reliability import command, space_file, trials, wait_for

@pytest.fixture(autouse=True)
def ctrl_c_reaches_python():
    """Python's own SIGINT handler, as under a terminal: a shell starts a background job (pytest, say) with
    SIGINT ignored, and a search keeps an ignored signal ignored."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


EPOCHS = 3  # 64 images at batch 32: 2 training batches an epoch, so batch@3 is the middle of epoch 2 (of 3)
REQUEUED = "requeued"


def published(url):
    """Whether the end-of-study report reached the study (optuna-dashboard's note)."""
    storage = optuna.storages.get_storage(url)
    return any(k.startswith("dashboard:") for k in storage.get_study_system_attrs(storage.get_study_id_from_name("durable")))


@pytest.mark.long(25)
@pytest.mark.parametrize("at,sig,ends,resumes_after", [
    ("ask", "SIGTERM", None, 0),  # before the first ask: no trial yet
    ("asked", "SIGTERM", REQUEUED, 0),  # between the ask and the first epoch
    ("batch@3", "SIGINT", REQUEUED, 1),  # mid-epoch: the epoch is lost, the one before is kept
    ("checkpointed@2", "SIGTERM", REQUEUED, 2),  # between an epoch's checkpoint and its report
    ("checkpointed@3", "SIGTERM", TrialState.COMPLETE, None),  # the last epoch finished: nothing to redo
    ("finish", "SIGINT", TrialState.COMPLETE, None),  # inside the trial's end, before Optuna is told
    ("report", "SIGTERM", TrialState.COMPLETE, None),  # during the end-of-study report
])
def test_a_stop_at_each_instant_ends_the_trial_once_and_loses_no_finished_epoch(
        tmp_path, capsys, monkeypatch, at, sig, ends, resumes_after):
    """Exit 143 (130 for Ctrl-C), no trial RUNNING, no traceback; an interrupted trial is FAIL with its
    reason and a WAITING copy, a trial whose last epoch finished is COMPLETE; the next run finishes the
    study and the retry's per-epoch history equals an unbroken run's."""
    url = f"sqlite:///{tmp_path}/d.db"
    argv = ["--space", str(space_file(tmp_path, epochs=EPOCHS)), "--storage", url, "--n-trials", "1"]
    monkeypatch.setenv("SNN_STOP_AT", at)
    monkeypatch.setenv("SNN_STOP_SIGNAL", sig)
    assert run_cli.main(argv) == 128 + signal.Signals[sig]
    out, err = capsys.readouterr()
    why = stop.WHY[signal.Signals[sig]]
    assert f"{why}: run the same command again to resume" in err and "Traceback" not in out + err
    first = trials(url)
    assert TrialState.RUNNING not in [t.state for t in first]
    if ends is None:
        assert first == []
    elif ends == REQUEUED:
        assert [t.state for t in first] == [TrialState.FAIL, TrialState.WAITING]
        assert first[0].user_attrs["fail_reason"] == f"{why}; queued again"
    else:
        assert [t.state for t in first] == [ends] and len(first[0].user_attrs["history"]) == EPOCHS
    assert not published(url)  # a stopped search publishes no report, not even half of one

    monkeypatch.delenv("SNN_STOP_AT")
    assert run_cli.main(argv) == 0
    done = trials(url)
    assert published(url)
    assert [t.state for t in done].count(TrialState.COMPLETE) == 1 and TrialState.RUNNING not in [t.state for t in done]
    trial = next(t for t in done if t.state == TrialState.COMPLETE)
    if resumes_after is not None:
        assert trial.user_attrs["starts"][-1] == resumes_after  # every finished epoch kept
    unbroken = fit(build(trial.user_attrs["config"]), test=False)
    assert [h["val_acc"] for h in trial.user_attrs["history"]] == [r.metrics["val_acc"] for r in unbroken.history]


@pytest.mark.long(15)
def test_a_stop_while_the_workers_start_starts_no_more_and_stops_those_started(tmp_path, capsys, monkeypatch):
    """SIGTERM after the first worker is forked: the second is never started, the first sees its parent's
    flag at its first safe point; exit 143, nothing RUNNING, no worker left."""
    url = f"sqlite:///{tmp_path}/d.db"
    monkeypatch.setenv("SNN_STOP_AT", "workers")
    argv = ["--space", str(space_file(tmp_path, epochs=EPOCHS)), "--storage", url, "--n-trials", "4",
            "--workers", "2"]
    assert run_cli.main(argv) == 143
    out, err = capsys.readouterr()
    assert "started 1 workers" in out and "Traceback" not in out + err
    assert "preempted (SIGTERM): run the same command again to resume" in err
    pid = int(out.split("(pids ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped
    assert TrialState.RUNNING not in [t.state for t in trials(url)]


@pytest.mark.long(40)
def test_a_killed_worker_is_named_and_the_parent_still_reports_the_finished_study(tmp_path):
    """SIGKILL of one of two workers: the other retries its trial once its heartbeat is stale and finishes
    the study; the parent prints "done." and the report, names the dead worker and exits 137."""
    url = f"sqlite:///{tmp_path}/d.db"
    space = space_file(tmp_path, epochs=6, data=", limit: 256")
    parent = subprocess.Popen(command(space, url, 3, "--workers", "2"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(url, lambda ts: sum(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1
                                     for t in ts) == 2)
        victim = next(t for t in trials(url) if t.state == TrialState.RUNNING)
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
    finally:
        out = communicate(parent, 300)
    assert parent.returncode == 137, out
    assert f"(pid {pid}) was killed by SIGKILL" in out and "\ndone. " in out and "Traceback" not in out
    done = trials(url)
    assert sum(t.state == TrialState.COMPLETE for t in done) == 3 and TrialState.RUNNING not in [t.state for t in done]
    assert published(url)


def freeze(path):
    """Make the folder ``path`` unwritable: read-only for a user, immutable for root (who ignores modes)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip(f"chattr +i is not supported on {path}'s file system, and root ignores a read-only mode")


def thaw(path):
    if not path.exists():
        return
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.mark.parametrize("when", ["start", "checkpoint", "finish"])
def test_a_study_folder_that_turns_unwritable_ends_the_trial_in_one_line(tmp_path, capsys, monkeypatch, when):
    """Before the trial's config is written, at an epoch's checkpoint, or when a completed trial's model is
    kept as an artifact: the trial ends with one line naming the path (``fail_reason`` or ``file_error``),
    never a traceback; nothing stays RUNNING; the worker exits 2 in one line."""
    from search import trial as trial_module

    url = f"sqlite:///{tmp_path}/d.db"
    folder = {"start": tmp_path / "durable" / "trials", "checkpoint": tmp_path / "durable" / "trials" / "0",
              "finish": tmp_path / "durable" / "artifacts"}[when]
    if when == "start":
        folder.mkdir(parents=True)
        freeze(folder)
    else:
        real = trial_module.TrialRecord.update

        def update(record, report):  # after the first epoch
            freeze(folder)
            return real(record, report)

        monkeypatch.setattr(trial_module.TrialRecord, "update", update)
    try:
        code = run_cli.main(["--space", str(space_file(tmp_path, epochs=2)), "--storage", url, "--n-trials", "1"])
    finally:
        thaw(folder)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, err
    assert f"cannot write {folder}" in err and ("Operation not permitted" in err or "Permission denied" in err)
    ended = trials(url)
    assert TrialState.RUNNING not in [t.state for t in ended]
    if when == "finish":  # the trial's results are real: it completes, without its artifact
        assert [t.state for t in ended] == [TrialState.COMPLETE]
        assert ended[0].user_attrs["file_error"].startswith(f"cannot write {folder}")
    else:  # not the config's fault: a copy waits for a writable folder
        assert [t.state for t in ended] == [TrialState.FAIL, TrialState.WAITING]
        assert ended[0].user_attrs["fail_reason"].startswith(f"cannot write {folder}")
        assert ended[0].user_attrs["fail_reason"].endswith("; queued again")
        assert "fail_reason" not in ended[1].user_attrs and "file_error" not in ended[1].user_attrs


def test_a_stop_that_breaks_the_data_loader_still_queues_the_trial_again(tmp_path, capsys, monkeypatch):
    """A SIGTERM to the process group also ends the data loader's workers, and torch then raises a
    RuntimeError in the trial: the trial is still queued again, not failed for good."""
    def fit(cfg, callback, test):
        signal.raise_signal(signal.SIGTERM)
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")

    monkeypatch.setattr("search.trial.fit", fit)
    url = f"sqlite:///{tmp_path}/d.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "1"]) == 143
    first, copy = trials(url)
    assert first.user_attrs["fail_reason"] == "preempted (SIGTERM); queued again" and copy.state == TrialState.WAITING


def test_a_data_set_that_cannot_be_read_fails_the_trial_not_the_worker(tmp_path, capsys, monkeypatch):
    """Permission denied on a file outside the study folder is the trial's error, not an unwritable folder."""
    def fit(cfg, callback, test):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "train.bin"))

    monkeypatch.setattr("search.trial.fit", fit)
    url = f"sqlite:///{tmp_path}/d.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "2"]) == 0
    assert [t.user_attrs["fail_reason"].split(":")[0] for t in trials(url)] == ["PermissionError"] * 2


def test_snn_train_stops_after_the_batch_and_keeps_the_last_epoch(tmp_path, capsys, monkeypatch):
    from trainer.__main__ import main

    monkeypatch.setenv("SNN_STOP_AT", "batch@3")
    monkeypatch.setenv("SNN_STOP_SIGNAL", "SIGINT")
    overrides = ["--set", f"run.out_dir={tmp_path}", "--set", "data.limit=64", "--set", "model.width=4",
                 "--set", "optim.epochs=3", "--set", "data.timesteps=2", "--set", "data.batch_size=32"]
    assert main(overrides) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C): the last finished epoch is kept" in err and "run.resume=true" in err
    from trainer.checkpoint import load_history

    assert len(load_history(tmp_path)) == 1  # epoch 1 kept; epoch 2 was cut after its first batch
    monkeypatch.delenv("SNN_STOP_AT")
    assert main([*overrides, "--set", "run.resume=true"]) == 0


def test_retrain_validates_the_exported_file_before_the_final_overrides(tmp_path, capsys):
    """``final`` would replace optim.epochs: a bad value in the file is still an error, not hidden."""
    path = tmp_path / "best.yaml"
    path.write_text("optim: {epochs: -3}\nprovenance: {final: {optim.epochs: 5}}\n")
    assert retrain.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "optim.epochs" in err
    assert not (tmp_path / "retrain").exists()


def test_a_bad_storage_url_in_a_space_file_names_the_file_and_the_key(tmp_path, capsys):
    space = space_file(tmp_path, study=", storage: 'nodriver+x://y'")
    assert run_cli.main(["--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {space}: study.storage: storage nodriver+x://y: cannot open") and err.count("\n") == 1


def test_stop_signals_set_a_flag_and_a_ctrl_c_during_a_stop_raises_only_in_computation():
    before = signal.getsignal(signal.SIGTERM)
    with stop.handling():
        signal.raise_signal(signal.SIGTERM)  # raises nothing here
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(stop.Stopped) as stopped:
            stop.check()
        assert stopped.value.code == 143 and stopped.value.why == "preempted (SIGTERM)"
        signal.raise_signal(signal.SIGINT)  # a Ctrl-C during the stop, outside computation: no raise
        with pytest.raises(KeyboardInterrupt), stop.interruptible():
            signal.raise_signal(signal.SIGINT)  # inside: at once
        assert stop.requested() == signal.SIGTERM  # the first signal says why
    assert signal.getsignal(signal.SIGTERM) is before
    with stop.handling():
        assert stop.requested() == 0  # each handling starts clear


def test_a_signal_ignored_on_entry_stays_ignored():
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop.handling():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, saved)


def test_a_stopped_control_trial_is_queued_again_and_resumed(tmp_path, capsys, monkeypatch):
    """The control arm's trials live the same life: the second ask goes to the control arm (the arm furthest
    behind its budget), a SIGTERM there queues its trial again, and the next run finishes both arms."""
    url = f"sqlite:///{tmp_path}/d.db"
    argv = ["--space", str(space_file(tmp_path, epochs=EPOCHS, control="false")), "--storage", url, "--n-trials", "1"]
    monkeypatch.setenv("SNN_STOP_AT", "asked@2")
    assert run_cli.main(argv) == 143
    assert [t.state for t in trials(url)] == [TrialState.COMPLETE]
    control = optuna.load_study(study_name="durable.control", storage=url).trials
    assert [t.state for t in control] == [TrialState.FAIL, TrialState.WAITING]
    assert control[0].user_attrs["fail_reason"] == "preempted (SIGTERM); queued again"
    monkeypatch.delenv("SNN_STOP_AT")
    assert run_cli.main(argv) == 0
    control = optuna.load_study(study_name="durable.control", storage=url).trials
    assert [t.state for t in control] == [TrialState.FAIL, TrialState.COMPLETE]
    assert control[1].user_attrs["config"]["heads"]["exits"] == [] and published(url)

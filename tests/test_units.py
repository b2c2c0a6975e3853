"""Unit tests of the search's plumbing: the budget, the storage wrapper, retries and the worker launcher."""

import json
import multiprocessing
import os
import pickle
import signal
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search import compat, workers
from search.budget import ask_within, budget_lock, claim_worker, remaining, used
from search.retry import Requeue, requeue, retry_history
from search.run import main as run_main
from search.run import make_parser
from search.storage import HeartbeatJournalStorage, artifact_location, open_storage, study_dir
from trainer import stop
from trainer.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_with(url, states):
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.raw_storage = open_storage(url)  # what workers pass to the budget (Optuna wraps its own in a cache)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, state in enumerate(states):
        study.add_trial(create_trial(state=state, params={"x": i / 10}, distributions=dist,
                                     value=0.5 if state == TrialState.COMPLETE else None))
    return study


def test_the_budget_counts_finished_running_and_queued_trials_but_not_retried_failures(tmp_path):
    S = TrialState
    study = study_with(f"sqlite:///{tmp_path}/b.db", [S.COMPLETE, S.PRUNED, S.RUNNING, S.FAIL, S.FAIL])
    trials = study.get_trials(deepcopy=False)
    assert used(trials) == 5  # both FAILs count: neither was queued again
    assert requeue(study, trials[4], max_retry=2)  # trial 4 failed with its worker: queued again
    trials = study.get_trials(deepcopy=False)
    assert trials[-1].state == S.WAITING and retry_history(trials[-1]) == [4]
    assert used(trials) == 5  # the FAIL no longer counts, its WAITING copy does: a retry costs nothing
    assert remaining(trials, 5) == 1  # the copy still has to be asked for
    assert remaining(trials, 8) == 4


def test_ask_within_pops_retries_first_and_stops_at_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    study = study_with(url, [TrialState.COMPLETE, TrialState.FAIL])
    requeue(study, study.get_trials()[1], max_retry=None)
    storage = study.raw_storage
    first = ask_within(study, storage, url, n_trials=2)
    assert first is not None and first.params == {"x": 0.1}  # the WAITING copy, with the failed trial's params
    study.tell(first, 0.7)
    assert ask_within(study, storage, url, n_trials=2) is None  # two trials used: nothing more to ask


def test_requeue_respects_max_retry_and_drops_the_old_fail_reason(tmp_path):
    study = study_with(f"sqlite:///{tmp_path}/b.db", [TrialState.RUNNING])
    trial = study.get_trials()[0]
    compat.storage(study).set_trial_user_attr(compat.trial_id(trial), "fail_reason", "worker died")
    assert requeue(study, study.get_trials()[0], max_retry=1)
    assert study.get_trials()[0].state == TrialState.FAIL  # a RUNNING trial is failed first
    copy = study.get_trials()[1]
    assert copy.state == TrialState.WAITING and "fail_reason" not in copy.user_attrs
    compat.storage(study).set_trial_state_values(compat.trial_id(copy), TrialState.RUNNING)
    assert not requeue(study, study.get_trials()[1], max_retry=1)  # its one retry is used up
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]


def test_budget_lock_excludes_other_holders(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    storage, events = open_storage(url), []
    held = threading.Event()

    def other():
        held.wait()
        with budget_lock(storage, url, "s"):
            events.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with budget_lock(storage, url, "s"):
        held.set()
        time.sleep(0.3)
        events.append("first")
    thread.join(5)
    assert events == ["first", "other"]


def test_each_worker_claims_its_own_number(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    study = study_with(url, [])
    assert [claim_worker(study, study.raw_storage, url) for _ in range(3)] == [0, 1, 2]


def test_storage_urls_and_study_folders(tmp_path):
    assert study_dir(f"sqlite:///{tmp_path}/x.db", "x") == tmp_path / "x"
    assert study_dir(f"journal:{tmp_path}/j.log", "x") == tmp_path / "x"
    assert study_dir("postgresql://u@h/db", "x").as_posix() == "studies/x"
    assert artifact_location("s3://bucket", tmp_path) == "s3://bucket"
    assert artifact_location(None, tmp_path) == str((tmp_path / "artifacts").resolve())
    with pytest.raises(UserError, match=r"storage 'nonsense': not an SQLAlchemy URL or a journal file"):
        open_storage("nonsense")
    assert pickle.loads(pickle.dumps(Requeue(3))).max_retry == 3  # Ray pickles the storage with it


def test_journal_heartbeats_judge_a_trial_stale_after_the_grace_period(tmp_path):
    storage = open_storage(f"journal:{tmp_path}/j.log", heartbeat=1)
    assert isinstance(storage, HeartbeatJournalStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(compat.trial_id(trial))
    study_id = storage.get_study_id_from_name("s")
    assert storage.stale_trial_ids(study_id) == []
    beat = storage.beats / str(compat.trial_id(trial))
    old = time.time() - storage.grace - 1
    os.utime(beat, (old, old))
    assert storage.stale_trial_ids(study_id) == [compat.trial_id(trial)]
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]  # queued again


def test_each_worker_gets_the_parents_flags_and_nothing_that_would_make_it_start_workers():
    argv = ["--space", "s.yaml", "--workers", "2", "--devices", "cpu,cuda:1", "--set", "a=1", "--set", "b=[1, 2]",
            "--storage", "journal:x.log", "--timeout", "60", "--base", "configs/x.yaml"]
    parent = make_parser().parse_args(argv)
    child = make_parser().parse_args(workers.child_args(parent, 1, "cuda:1"))
    assert child.workers is None and child.devices is None and child.worker_index == 1
    assert child.overrides == ["a=1", "b=[1, 2]", "run.device=cuda:1"]
    same = {k for k in vars(parent)} - {"workers", "devices", "worker_index", "overrides"}
    assert {k: vars(child)[k] for k in same} == {k: vars(parent)[k] for k in same}


def test_prefixes_of_flags_are_refused():
    with pytest.raises(SystemExit) as err:
        make_parser().parse_args(["--space", "s.yaml", "--dev", "cpu,cpu"])
    assert err.value.code == 2


def test_devices_are_dealt_round_robin_and_checked():
    assert workers.devices("cpu,cuda:1", 3) == ["cpu", "cuda:1", "cpu"]
    assert workers.devices(None, 2) == ["auto", "auto"]
    with pytest.raises(UserError, match="--devices: 'gpu0' is not a device"):
        workers.devices("cpu,gpu0", 2)


class FakeProc:
    """A worker as multiprocessing's fork server would start it, already ended with ``code``: it records its
    target and start."""

    def __init__(self, pid, target, args, name, code=0):
        self.pid, self.target, self.args, self.name, self.exitcode = pid, target, args, name, code
        self.started = False

    def start(self):
        self.started = True


class FakeContext:
    """multiprocessing's forkserver context; ``codes`` are the workers' exit codes."""

    def __init__(self, codes):
        self.codes, self.threads, self.procs = codes, None, []

    def Process(self, target, args, name):  # noqa: N802 - multiprocessing's name
        index = len(self.procs)
        self.procs.append(FakeProc(1000 + index, target, args, name, self.codes[index]))
        return self.procs[-1]

    def Value(self, kind, value, lock):  # noqa: N802 - multiprocessing's name
        return multiprocessing.Value(kind, value, lock=lock)


def fake_context(monkeypatch, codes):
    context = FakeContext(codes)
    monkeypatch.setattr(workers, "start_server", lambda threads: setattr(context, "threads", threads))
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: context if method == "forkserver" else None)
    return context


def test_launch_forks_one_pinned_worker_per_device_and_returns_the_worst_code(monkeypatch):
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    context = fake_context(monkeypatch, [0, 1])
    args = make_parser().parse_args(["--space", "s.yaml", "--workers", "2"])
    assert workers.launch(run_main, args, ["cpu", "cpu"]) == 1
    assert context.threads == 2  # the fork server's libraries: 4 cores, 2 CPU workers
    assert all(p.started and p.target is workers.work and p.args[0] is run_main for p in context.procs)
    assert [p.args[2] for p in context.procs] == [2, 2]  # 4 cores, 2 CPU workers: 2 threads each
    assert [p.args[1][-1] for p in context.procs] == ["run.device=cpu"] * 2
    assert [make_parser().parse_args(p.args[1]).worker_index for p in context.procs] == [0, 1]


def test_a_worker_killed_by_a_signal_is_a_failure_named_in_one_line(monkeypatch, caplog):
    fake_context(monkeypatch, [0, -9])
    args = make_parser().parse_args(["--space", "s.yaml", "--workers", "2"])
    assert workers.launch(run_main, args, ["cpu", "cpu"]) == 137  # as a shell says it (128 + SIGKILL)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelname == "WARNING"] == [
        ("snn.search.workers", "WARNING", "worker 1 (pid 1001) was killed by SIGKILL")]


def stand_in_main(argv: list[str]) -> int:
    """``search.run.main`` for a real fork server's worker: writes what the worker was given, exits with its
    index (module-level: the server unpickles it by name, as it does the real one)."""
    import multiprocessing

    import torch

    args = make_parser().parse_args(argv)
    seen = [torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.getsid(0) == os.getpid(),
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, multiprocessing.get_start_method()]
    (args.study_dir / f"{args.worker_index}.json").write_text(json.dumps(seen))
    return args.worker_index


def test_workers_forked_by_the_server_lead_their_own_sessions_like_processes_of_their_own(tmp_path, monkeypatch):
    """A real fork server: each worker runs in a session of its own, with its share of the cores, SIGTERM's
    default action and the platform's start method for its own children; the worst exit code comes back."""
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    args = make_parser().parse_args(["--space", "s.yaml", "--workers", "2", "--study-dir", str(tmp_path)])
    assert workers.launch(stand_in_main, args, ["cpu", "cpu"]) == 1
    for index in (0, 1):
        threads, variable, *rest = json.loads((tmp_path / f"{index}.json").read_text())
        assert threads == 1 and variable == "1" and rest == [True, True, "fork"]


def stopping_main(argv: list[str]) -> int:
    """A worker that computes until its parent's stop reaches it, then goes on computing (as a trial's last
    batch does) until a Ctrl-C stops it there; it writes what stopped it."""
    args = make_parser().parse_args(argv)
    out = args.study_dir / f"{args.worker_index}.json"
    with stop.handling():
        (args.study_dir / f"{args.worker_index}.started").touch()
        deadline = time.time() + 60  # a broken stop fails the test, never hangs it
        while not stop.requested() and time.time() < deadline:
            time.sleep(0.01)
        seen = [stop.requested()]
        try:
            with stop.interruptible():
                (args.study_dir / f"{args.worker_index}.ready").touch()
                time.sleep(60)
        except KeyboardInterrupt:
            seen.append("interrupted at once")
    out.write_text(json.dumps(seen))
    return 130


def test_the_parents_stop_reaches_every_worker_and_a_second_ctrl_c_stops_them_mid_computation(tmp_path):
    """A real fork server: the parent's first Ctrl-C reaches both workers through its flag (no signal); the
    second, while they still compute, is passed on as a SIGINT and stops them at once."""
    args = make_parser().parse_args(["--space", "s.yaml", "--workers", "2", "--study-dir", str(tmp_path)])

    def ctrl_c_twice():
        deadline = time.time() + 60
        while not all((tmp_path / f"{i}.started").exists() for i in (0, 1)) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
        while not all((tmp_path / f"{i}.ready").exists() for i in (0, 1)) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=ctrl_c_twice, daemon=True)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal (pytest may run as a
    try:  # background job, whose SIGINT is ignored, and a search keeps an ignored signal ignored)
        with stop.handling():
            thread.start()
            code = workers.launch(stopping_main, args, ["cpu", "cpu"])
        thread.join()
    finally:
        signal.signal(signal.SIGINT, saved)
    assert code == 130
    assert [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)] == [[2, "interrupted at once"]] * 2


def _state_with(directory, epochs):
    """A real ``last.pt`` whose history holds ``epochs`` reports."""
    import torch

    from trainer.checkpoint import save_state

    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_state(directory, net, optimizer, scheduler, epochs - 1, [{"epoch": e} for e in range(epochs)],
               torch.device("cpu"))


def test_the_resume_state_is_uploaded_every_n_epochs_and_only_the_newest_stays(tmp_path, monkeypatch):
    from optuna.artifacts import FileSystemArtifactStore

    from search.remote import ATTR, RemoteState, drop
    from trainer.checkpoint import load_history

    (tmp_path / "store").mkdir()
    store, said = FileSystemArtifactStore(str(tmp_path / "store")), []
    trial = optuna.create_study().ask()
    remote, here = RemoteState(store, 2, said.append), tmp_path / "a"
    for epochs in (1, 2, 3, 4, 5):
        _state_with(here, epochs)
        remote.upload(trial, here, epochs)
        assert trial.user_attrs.get(ATTR, {}).get("epochs") == (epochs // 2 * 2 or None)
        assert len(os.listdir(tmp_path / "store")) == (epochs >= 2)  # the one before is removed
    attrs = trial.user_attrs  # what a retry inherits

    there = tmp_path / "b"  # another machine: nothing local, so the upload is downloaded
    there.mkdir()
    remote.fetch(attrs, there)
    assert len(load_history(there)) == 4
    _state_with(there, 5)  # a local state as new as the upload (or newer) is kept
    remote.fetch(attrs, there)
    assert len(load_history(there)) == 5 and not said

    drop(store, attrs)  # the trial ended for good
    assert os.listdir(tmp_path / "store") == []
    gone = tmp_path / "c"  # the upload is gone (or the store away): a warning, and no file
    gone.mkdir()
    remote.fetch(attrs, gone)
    assert not os.listdir(gone) and "cannot download the resume state after epoch 4" in said[-1]

    def away(*args):
        raise ConnectionError("bucket unreachable")

    monkeypatch.setattr(store, "write", away)
    remote.upload(trial, here, 6)
    assert trial.user_attrs[ATTR]["epochs"] == 4  # still the last upload that landed
    assert said[-1].startswith("cannot upload the resume state after epoch 6 (ConnectionError: bucket unreachable)")

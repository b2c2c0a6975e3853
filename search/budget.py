"""A study-wide trial budget that many workers share exactly, and the heartbeat of a running trial.

Optuna's ``MaxTrialsCallback`` checks the count after a trial ends, so two workers finishing at once
can both start one more. Here each worker takes a lock, counts the study's trials and asks for a new
trial only while the count is under budget. The lock is a PostgreSQL advisory lock for PostgreSQL
storages (workers on many machines) and a file lock ``<db or journal>.budget.lock`` otherwise (workers on
one machine; never ``<journal>.lock``, the path of Optuna's own journal lock).

The budget counts COMPLETE, PRUNED, RUNNING and WAITING trials and the FAILed ones that were not queued
again: a retry of a killed trial costs nothing, and a trial that failed for good (diverged, out of
memory) still uses its slot, so a study whose every config fails ends instead of looping.
"""

from __future__ import annotations

import fcntl
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from search.retry import retry_history
from trainer.logs import logger
from search.storage import heartbeat_enabled

log = logger(__name__)
USED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@contextmanager
def budget_lock(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """Hold the study's budget lock (blocks while another worker holds it)."""
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        key = zlib.crc32(study_name.encode())
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    if isinstance(storage, RDBStorage):
        path = Path(storage.engine.url.database or "optuna.db")
    else:
        path = Path(url.removeprefix("journal:"))
    with open(path.with_name(path.name + ".budget.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def used(trials: list[FrozenTrial]) -> int:
    """Trials that count against the budget (see the module docstring)."""
    retried = {n for t in trials for n in retry_history(t)}
    return sum(t.state in USED or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def remaining(trials: list[FrozenTrial], n_trials: int) -> int:
    """Asks still to make: new trials under the budget plus the queued (WAITING) retries, which an ask
    pops first and which cost nothing. Both backends start exactly this many more."""
    return n_trials - used(trials) + sum(t.state == TrialState.WAITING for t in trials)


def ask_within(
    study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, n_trials: int
) -> optuna.Trial | None:
    """The next queued retry, or a new trial while the study is under budget (all workers together)."""
    with budget_lock(storage, url, study.study_name):
        if remaining(study.get_trials(deepcopy=False), n_trials) <= 0:
            return None
        with warnings.catch_warnings():  # Optuna warns that heartbeats expect study.optimize; see Heartbeat
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()  # pops a WAITING trial first


def claim_worker(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str) -> int:
    """A number no other worker of this study got (0, 1, 2, ...): each worker's sampler seed stream."""
    with budget_lock(storage, url, study.study_name):
        index = study.user_attrs.get("workers", 0)
        study.set_user_attr("workers", index + 1)
    return index


class Heartbeat:
    """Beat for a running trial, so that other workers fail and re-queue it if this process dies.

    A failed beat (the storage briefly unreachable or locked) is logged and tried again at the next
    interval; the thread only ends with the trial.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, number: int) -> None:
        self.storage, self.trial_id, self.number = storage, trial_id, number
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as err:  # noqa: BLE001 - any storage error: keep beating
            log.warning("heartbeat of trial %d failed (%s: %s); retrying", self.number, type(err).__name__, err)

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        if heartbeat_enabled(self.storage):
            self.beat()
            interval = self.storage.get_heartbeat_interval()
            self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()

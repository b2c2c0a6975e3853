"""A study-wide trial budget that many workers share exactly.

Optuna's ``MaxTrialsCallback`` checks the count after a trial ends, so two workers finishing at once
can both start one more. Here each worker takes a lock, counts the study's trials (running ones
included) and asks for a new trial only while the count is under budget. The lock is a PostgreSQL
advisory lock for PostgreSQL storages (workers on many machines) and a file lock next to the SQLite
database or journal file otherwise (workers on one machine).
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
from optuna.trial import TrialState
from sqlalchemy import text

from search.storage import heartbeat_enabled

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)


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
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ask_within(
    study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, n_trials: int
) -> optuna.Trial | None:
    """A new trial, or None once the study holds ``n_trials`` trials (all workers together)."""
    with budget_lock(storage, url, study.study_name):
        if len(study.get_trials(deepcopy=False, states=COUNTED)) >= n_trials:
            return None
        with warnings.catch_warnings():  # Optuna warns that heartbeats expect study.optimize; see Heartbeat
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()


class Heartbeat:
    """Beat for a running trial (RDB storages), so other workers can fail it if this process dies."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> None:
        self.storage, self.trial_id = storage, trial._trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _beat(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        if heartbeat_enabled(self.storage):
            self.storage.record_heartbeat(self.trial_id)
            interval = self.storage.get_heartbeat_interval()
            self.thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()

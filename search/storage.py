"""Study storage from a URL: any SQLAlchemy URL (SQLite, PostgreSQL, ...) or a journal file.

- ``sqlite:///studies/<name>.db`` (default): one machine, a few processes.
- ``postgresql://user@host/db``: many workers on many machines.
- ``journal:path/to/file.log`` (or any ``*.log`` path): Optuna's JournalFileBackend, fast and safe for many
  processes on one machine.

RDB storages get heartbeats, so a trial whose process died is failed once it misses three beats.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

STUDIES_DIR = Path("studies")


def default_url(study_name: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study_name}.db"


def open_storage(url: str, heartbeat: int = 10) -> optuna.storages.BaseStorage:
    """The Optuna storage behind ``url``; raises ValueError with a one-line message on a bad URL."""
    if url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"storage: {url!r} is not an SQLAlchemy URL or a journal file (journal:path.log)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            engine_kwargs={"connect_args": {"timeout": 60}} if parsed.get_backend_name() == "sqlite" else {},
        )


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether running trials beat, so that a dead worker's trial can be told apart (RDB storages)."""
    return isinstance(storage, RDBStorage) and bool(storage.get_heartbeat_interval())


def fail_stale(storage: optuna.storages.BaseStorage, study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker stopped beating (RDB storages); returns their numbers."""
    if not heartbeat_enabled(storage):
        return []
    running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
    return [n for n in running if n in failed]

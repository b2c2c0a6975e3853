"""Study storage from a URL: any SQLAlchemy URL (SQLite, PostgreSQL, ...) or a journal file.

- ``sqlite:///studies/<name>.db`` (default): one machine, a few processes.
- ``postgresql://user@host/db``: many workers on many machines.
- ``journal:path/to/file.log`` (or any ``*.log`` path): Optuna's JournalFileBackend, fast and safe for many
  processes on one machine.

Every storage beats for running trials (RDB storages in their own table, journal files in one small
file per running trial beside the journal) and gives Optuna's ``fail_stale_trials`` the project's one
way of queueing a trial again (``search/retry.py``): a trial whose worker died is failed and queued
again with the same params, and the retry resumes from the dead trial's checkpoint.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from urllib.parse import urlparse

from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, GCSArtifactStore
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from search import compat
from search.retry import Requeue
from trainer.errors import UserError
from trainer.registry import Registry

STUDIES_DIR = Path("studies")


def default_url(study_name: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study_name}.db"


def study_dir(url: str, study_name: str) -> Path:
    """Where a study's files live (trial directories, artifacts, exports): beside a SQLite or journal file
    (``studies/x.db`` -> ``studies/x/``), else ``studies/<name>/``."""
    if _is_journal(url):
        return Path(url.removeprefix("journal:")).parent / study_name
    if url.startswith("sqlite:///") and make_url(url).database not in (None, "", ":memory:"):
        return Path(make_url(url).database).parent / study_name
    return STUDIES_DIR / study_name


def arm_dir(root: Path, main: str, arm: str) -> Path:
    """The folder of study ``arm`` of the search ``main`` whose own folder is ``root``: a companion study's
    sits beside it (``studies/x/`` -> ``studies/x.control/``, ``studies/x.confirm/``)."""
    root = root.resolve()  # "." has no name to extend
    return root.with_name(root.name + arm.removeprefix(main))


def timeouts(heartbeat: int) -> tuple[int, int]:
    """(storage timeout, grace period) in seconds: a beat blocked for the whole storage timeout still
    lands within the grace period, so a slow storage never makes a live trial look dead."""
    storage_timeout = max(5, 2 * heartbeat)
    return storage_timeout, storage_timeout + heartbeat


def _is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def _started(trial: FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


class HeartbeatRDBStorage(compat.Heartbeats, RDBStorage):
    """Optuna's RDB storage, whose stale trials also include RUNNING trials that never beat (a worker that
    died between its ask and its first beat) once the grace period has passed since they started: Optuna
    judges only trials with a heartbeat row, so such a trial would stay RUNNING for ever."""

    def stale_trial_ids(self, study_id: int) -> list[int]:
        stale = compat.rdb_stale_trial_ids(self, study_id)
        beating, now = compat.rdb_beating_trial_ids(self), time.time()
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            tid = compat.trial_id(trial)
            if tid not in beating and tid not in stale and now - _started(trial) > self.grace_period:
                stale.append(tid)
        return stale


class HeartbeatJournalStorage(JournalStorage, compat.Heartbeats):
    """A journal storage with heartbeats: each running trial touches ``<journal>.beats/<trial_id>``.

    Beats are file modification times, so they add nothing to the journal and never wait for its lock.
    """

    def __init__(self, path: Path, heartbeat: int, retry: Requeue) -> None:
        super().__init__(JournalFileBackend(str(path)))
        self.beats = path.with_name(path.name + ".beats")
        self.beats.mkdir(exist_ok=True)
        self.heartbeat, self.grace = heartbeat, timeouts(heartbeat)[1]
        self.retry = retry

    def record_heartbeat(self, trial_id: int) -> None:
        (self.beats / str(trial_id)).touch()

    def stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = self.beats / str(compat.trial_id(trial))
            last = beat.stat().st_mtime if beat.exists() else _started(trial)  # no beat at all: since its start
            if now - last > self.grace:
                stale.append(compat.trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat

    def get_heartbeat_stale_trial_callback(self) -> Requeue:
        return self.retry


def open_storage(url: str, heartbeat: int = 10, max_retry: int | None = 2) -> optuna.storages.BaseStorage:
    """The Optuna storage behind ``url``; raises ValueError with a one-line message naming the URL."""
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = Requeue(max_retry)
        if _is_journal(url):
            path = Path(url.removeprefix("journal:"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                return HeartbeatJournalStorage(path, heartbeat, retry)
            except OSError as err:
                raise UserError(f"storage {url}: cannot open the journal file ({err.strerror})") from None
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise UserError(f"storage {url!r}: not an SQLAlchemy URL or a journal file (journal:path.log)") from None
        storage_timeout, grace = timeouts(heartbeat)
        backend = parsed.get_backend_name()
        if backend == "sqlite" and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect = {"sqlite": {"timeout": storage_timeout}, "postgresql": {"connect_timeout": storage_timeout}}
        for attempt in range(3):  # workers started at once race to create Optuna's tables; the loser retries
            try:
                return HeartbeatRDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                  heartbeat_stale_trial_callback=retry,
                                  engine_kwargs={"connect_args": connect.get(backend, {}), "pool_pre_ping": True})
            except (SQLAlchemyError, ImportError) as err:
                if attempt == 2 or isinstance(err, ImportError):
                    raise UserError(f"storage {url}: cannot open ({cause(err)})") from None
                time.sleep(0.5 * (attempt + 1))


def cause(err: BaseException) -> str:
    """The first line of what really went wrong in a storage error ("database is locked"), not Optuna's
    wrapper's guess ("... e.g. exceeding max length")."""
    for _ in range(8):  # SQLAlchemy's error holds the driver's as ``orig``; Optuna's wraps SQLAlchemy's
        inner = getattr(err, "orig", None) or err.__cause__
        if inner is None:
            break
        err = inner
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether running trials beat, so that a dead worker's trial can be told apart."""
    return isinstance(storage, compat.BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def fail_stale(study: optuna.Study) -> tuple[list[int], list[int]]:
    """Fail RUNNING trials whose worker stopped beating, each with a ``fail_reason``, and queue each again
    (up to ``max_retry``) through the storage's retry callback: (numbers queued again, numbers whose retries
    are used up). Optuna's ``fail_stale_trials`` does the same but cannot say why: a finished trial's attrs
    cannot change, so the reason is written while the trial still runs."""
    storage = compat.storage(study)
    if not heartbeat_enabled(storage):
        return [], []
    retry = storage.get_heartbeat_stale_trial_callback()
    queued, exhausted = [], []
    for tid in compat.stale_trial_ids(storage, compat.study_id(study)):
        trial = storage.get_trial(tid)
        try:
            storage.set_trial_user_attr(tid, "fail_reason", retry.reason(trial))
            if not storage.set_trial_state_values(tid, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker judged it first
        retry(study, storage.get_trial(tid))
        (queued if retry.retries_left(trial) else exhausted).append(trial.number)
    return sorted(queued), sorted(exhausted)


# URL scheme of study.artifacts -> Optuna's store for that service (any other: a folder)
ARTIFACT_STORES: Registry[Callable[[str], compat.ArtifactStore]] = Registry("artifact store")
ARTIFACT_STORES.register("s3")(lambda bucket: Boto3ArtifactStore(bucket))  # credentials: boto3's usual settings
ARTIFACT_STORES.register("gs")(lambda bucket: GCSArtifactStore(bucket))


def artifact_location(spec: str | None, root: Path) -> str:
    """What a study records as its user attr ``artifacts``: ``s3://bucket``, ``gs://bucket``, or an
    absolute folder (``spec``, else ``<root>/artifacts``)."""
    if spec and urlparse(spec).scheme in ARTIFACT_STORES:
        return spec
    return str(Path(spec or root / "artifacts").resolve())


def artifact_store(location: str) -> compat.ArtifactStore:
    """The store of trial files (``model.pt``, ``config.yaml``) for many machines: a bucket, or a folder
    they all mount."""
    url = urlparse(location)
    if url.scheme in ARTIFACT_STORES:
        try:
            return ARTIFACT_STORES[url.scheme](url.netloc)
        except ImportError as err:
            raise UserError(f"study.artifacts {location}: needs the {err.name} package") from None
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)

"""Every private Optuna and Ray name this project touches, and nothing else (PyTorch's are in
``trainer/compat.py``): an upgrade that renames one breaks here, in one file; ``tests/test_layout.py`` holds
the list each compat module may use and fails on any other private name anywhere."""

from __future__ import annotations

from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts._protocol import ArtifactStore  # the stores' common type; not re-exported
from optuna.storages._heartbeat import BaseHeartbeat  # what fail_stale_trials checks; not re-exported
from optuna.trial import FrozenTrial

__all__ = ["ArtifactStore", "BaseHeartbeat", "Heartbeats", "forget_stale_stop", "frozen", "live_trial",
           "rdb_beating_trial_ids", "rdb_stale_trial_ids", "searcher_done", "searcher_study", "searcher_trial",
           "stale_trial_ids", "storage", "study_id", "trial_id"]


def storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (Optuna keeps it private)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (unique across studies; ``number`` is per study)."""
    return trial._trial_id


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """A running trial as the storage holds it (system attrs included, such as ``retry_history``)."""
    return study._storage.get_trial(trial._trial_id)


class Heartbeats(BaseHeartbeat):
    """A storage that finds its stale trials itself: subclasses implement ``stale_trial_ids``, the public
    name of the hook that Optuna's ``fail_stale_trials`` calls."""

    def stale_trial_ids(self, study_id: int) -> list[int]:
        raise NotImplementedError

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(study_id)


def live_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """Trial ``number`` as the object that reports and sets attrs (the storage's id is private)."""
    return optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def study_id(study: optuna.Study) -> int:
    return study._study_id


def stale_trial_ids(storage: optuna.storages.BaseStorage, study_id: int) -> list[int]:
    """The trials a heartbeat storage judges stale (the hook Optuna's ``fail_stale_trials`` reads)."""
    return storage._get_stale_trial_ids(study_id)


def rdb_stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """RDBStorage's own stale trials: those whose heartbeat row is older than the grace period."""
    return optuna.storages.RDBStorage._get_stale_trial_ids(storage, study_id)


def rdb_beating_trial_ids(storage: optuna.storages.RDBStorage) -> set[int]:
    """Trials that have a heartbeat row (Optuna's schema names the table ``trial_heartbeats``)."""
    with storage.engine.connect() as conn:
        return {row[0] for row in conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}


# Ray Tune's OptunaSearch keeps its Optuna study and the Optuna trial of each Tune trial private.

def searcher_study(search: Any) -> optuna.Study:
    return search._ot_study


def searcher_trial(search: Any, tune_id: str) -> optuna.Trial | None:
    return search._ot_trials.get(tune_id)


def searcher_tune_ids(search: Any) -> list[str]:
    """The Tune trials the searcher has given an Optuna trial."""
    return list(search._ot_trials)


def searcher_done(search: Any, tune_id: str, done: bool = False) -> bool:
    """Whether the searcher has ended Tune trial ``tune_id``; ``done=True`` records that it has."""
    if done:
        search._completed_trials.add(tune_id)
    return tune_id in search._completed_trials


def forget_stale_stop(scheduler_view: Any, trial: Any) -> None:
    """Drop a STOP that Tune keeps for a paused ``trial``. Tune 2.x caches STOP for a trial it pauses
    while a save of it is in flight (synchronous PBT copies into a member that was pausing to wait) and
    executes it after the member's next result, so the restarted member ends an epoch later. A paused
    trial is restarted, never stopped, so such a STOP is always stale. ``scheduler_view`` is what Tune
    hands a scheduler."""
    decisions = scheduler_view._tune_controller._cached_trial_decisions
    if trial.status == "PAUSED" and decisions.get(trial.trial_id) == "STOP":
        del decisions[trial.trial_id]

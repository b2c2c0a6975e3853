"""Queueing a trial again: one function for every way a trial stops without finishing.

A worker interrupted (Ctrl-C), a worker that stopped beating (killed, preempted, its machine lost) and
a Ray driver that died with its trials RUNNING all end the same way: the trial is failed and a WAITING
copy with the same params is queued (Optuna's ``RetryHeartbeatStaleTrialCallback``, which records the
earlier attempts in the copy's ``retry_history``). Whoever runs the copy moves the newest ``last.pt``
of those attempts into its own directory and continues from the last finished epoch.
"""

from __future__ import annotations

import copy
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import compat


ATTEMPT_ATTRS = ("fail_reason", "file_error")  # what one attempt says of its own ending: never copied


def retry_history(trial: FrozenTrial) -> list[int]:
    """Numbers of the earlier attempts of this trial, oldest first (Optuna's retry callback's record)."""
    return trial.system_attrs.get("retry_history", [])


def requeue(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> bool:
    """Fail ``trial`` (if it is still RUNNING) and queue a copy, unless it already has ``max_retry``
    earlier attempts (``None``: no limit, for interruptions). True if a copy was queued."""
    storage = compat.storage(study)
    if trial.state == TrialState.RUNNING:
        storage.set_trial_state_values(compat.trial_id(trial), TrialState.FAIL)
    trial = copy.deepcopy(trial)  # the callback appends to the trial's own retry_history list
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}  # the copy's own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)
    return max_retry is None or len(retry_history(trial)) <= max_retry  # the callback appended this attempt


class Requeue:
    """The storages' stale-trial callback (``fail_stale`` has failed the trial already): a class, so a
    storage holding it still pickles for Ray."""

    def __init__(self, max_retry: int | None) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        requeue(study, trial, self.max_retry)

    def retries_left(self, trial: FrozenTrial) -> bool:
        """Whether a copy of ``trial`` will be queued (before this attempt is counted)."""
        return self.max_retry is None or len(retry_history(trial)) < self.max_retry

    def reason(self, trial: FrozenTrial) -> str:
        """What a stale ``trial``'s ``fail_reason`` says: queued again, or its retries are used up."""
        if self.retries_left(trial):
            return "its worker stopped beating (killed, preempted or lost); queued again"
        return f"its worker stopped beating; retries used up (study.max_retry={self.max_retry})"

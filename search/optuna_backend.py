"""Run a space file as an Optuna study: an ask-and-tell loop with a study-wide budget, retries of
trials whose worker died, and one shared trial runner (``search/trial.py``).

The loop (rather than ``study.optimize``) lets every ask happen under the budget lock, and lets a
worker wait for other workers' running trials: they finish, or stop beating and are queued again,
and then this worker may be the one that resumes them.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from functools import partial
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from search import compat
from search.budget import Heartbeat, ask_within, claim_worker, is_baseline
from search.progress import EpochProgress, TrialLine
from search.remote import RemoteState, drop
from search.pruners import make_pruner
from search.samplers import Grid, make_sampler
from search.space import Space, suggest
from search.storage import artifact_store, cause, fail_stale, heartbeat_enabled, study_dir
from search.study import BASELINE, create_study
from search.trial import Outcome, TrialRecord, directories, drop_checkpoints, finish, run_trial, trial_dir
from trainer import stop
from trainer.errors import UserError
from trainer.fit import EpochReport


POLL = 1.0  # seconds between a waiting worker's looks at the others' trials: it exits within a second of them


def _others_running(study: optuna.Study) -> bool:
    """Other workers' trials still RUNNING, where heartbeats can tell whether their worker died."""
    return heartbeat_enabled(compat.storage(study)) and bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _exhausted(study: optuna.Study) -> bool:
    return isinstance(study.sampler, Grid) and study.sampler.is_exhausted(study) and not study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,))


class Worker:
    """One process's share of a study: ask (under the budget lock), train, tell, until the budget is met."""

    def __init__(self, space: Space, storage: optuna.storages.BaseStorage, url: str, root: Path, tag: str = "",
                 position: int = 0) -> None:
        self.space, self.storage, self.url, self.root, self.tag = space, storage, url, root, tag
        self.study = create_study(space, storage, root)
        self.index = claim_worker(self.study, storage, url)
        self.study.sampler = make_sampler(space, self.index)
        self.study.pruner = make_pruner(space)
        self.artifacts = artifact_store(self.study.user_attrs["artifacts"])
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.epochs, self.line = EpochProgress(tag, position), TrialLine(tag)

    def say(self, text: str) -> None:
        print(f"{self.tag}{text}", flush=True)

    def run(self, timeout: float | None) -> optuna.Study:
        """Ask, train and tell until the study holds ``study.n_trials`` trials or time is up."""
        study, s = self.study, self.space.study
        started, announced = time.perf_counter(), False
        while timeout is None or time.perf_counter() - started < timeout:
            stop.check()  # between trials: nothing of a trial is under way
            queued, exhausted = fail_stale(study)
            if queued:
                self.say(f"trials {queued} stopped beating (their worker died): failed, and queued again "
                         f"with the same params (up to study.max_retry={s.max_retry} times)")
            if exhausted:
                for number in exhausted:
                    drop_checkpoints(trial_dir(self.root, number))
                    drop(self.artifacts, study.trials[number].user_attrs)
                self.say(f"trials {exhausted} stopped beating (their worker died) and used up their retries "
                         f"(study.max_retry={s.max_retry}): failed for good, checkpoints dropped")
            if _exhausted(study):
                self.say("grid exhausted: every point of the grid has run")
                break
            stop.point("ask")
            stop.check()
            trial = ask_within(study, self.storage, self.url, s.n_trials)
            if trial is None:
                if not _others_running(study):
                    break
                time.sleep(POLL)  # they finish, or go stale and are queued
                continue
            if not announced:
                pruner = s.pruner + ("" if s.pruner == "none" else f" from epoch {self.space.min_epochs()}")
                self.say(f"study {s.name!r}: running trials up to {s.n_trials} ({s.sampler}, pruner {pruner}); "
                         f"sampler seed stream {self.index}, trial files in {self.root / 'trials'}")
                announced = True
            try:
                ended = self.run_one(trial)
            except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:
                raise UserError(f"storage {self.url}: cannot write ({cause(err)}); trial {trial.number} stays RUNNING "
                                f"until its heartbeat goes stale, and the next run retries it") from None
            self.line(study, ended)
        if not announced:
            self.say(f"study {s.name!r} already has {s.n_trials} trials")
        return study

    def run_one(self, trial: optuna.Trial) -> FrozenTrial:
        """Train and end one asked trial. A stop signal, seen at a safe point from the ask to the last epoch's
        report, ends it through ``finish`` (FAIL, a copy queued that resumes from its last epoch) and raises
        ``Stopped``; one that comes later leaves it to end as it would, and the loop stops before the next."""
        study, single = self.study, len(self.space.study.metrics) == 1
        stop.point("asked")
        frozen = compat.frozen(study, trial)
        directory, earlier = directories(self.root, frozen)
        starts = frozen.user_attrs.get("starts", []) if earlier else []  # a retry inherits the original's attrs
        reference = is_baseline(frozen)
        uploads = RemoteState(self.artifacts, self.space.study.checkpoint_every, self.epochs.warn)

        def hook(record: TrialRecord, report: EpochReport, restored: bool) -> None:
            if single:
                trial.report(record.values[0], report.epoch + 1)  # step = epochs trained
            if restored:
                return
            for key, value in record.attrs.items():
                trial.set_user_attr(key, value)
            uploads.upload(trial, directory, report.epoch + 1)
            if single and not reference and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {report.epoch + 1} epochs")

        with Heartbeat(self.storage, compat.trial_id(trial), trial.number):  # from before the first suggestion
            try:
                trial.set_user_attr("worker", self.name)
                stop.check()
                try:
                    values = BASELINE if reference else suggest(trial, self.space.params)
                except Exception as err:  # noqa: BLE001 - a sampler that cannot draw fails this trial, not the worker
                    outcome = Outcome(TrialState.FAIL, [], fail_reason=f"cannot sample the params "
                                      f"({type(err).__name__}: {str(err)[:200]})")
                else:
                    outcome = run_trial(self.space, trial.number, values, directory, earlier, hook, self.epochs,
                                        starts, fetch=partial(uploads.fetch, frozen.user_attrs) if earlier else None)
            except KeyboardInterrupt as err:  # Stopped at a safe point, or a second Ctrl-C mid-computation
                signum = stop.requested() or signal.SIGINT  # the first stop says why
                why = stop.WHY[signum]
                finish(study, trial, Outcome(TrialState.FAIL, [], fail_reason=f"{why}; queued again",
                                             requeue=True), directory, self.artifacts)
                self.say(f"trial {trial.number} {why}: queued again, resumes from {directory / 'last.pt'}")
                raise stop.Stopped(signum) from None
        ended = finish(study, trial, outcome, directory, self.artifacts)
        problem = outcome.fail_reason if outcome.stop else ended.user_attrs.get("file_error")
        if problem:
            raise UserError(f"trial {trial.number}: {problem} (make {self.root} writable, or free space there, "
                            f"then run the same command again)")
        return ended


def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None,
        root: Path | None = None, tag: str = "", position: int = 0) -> optuna.Study:
    """Top the study up to ``study.n_trials`` trials (all workers together) with this process; trial
    files go under ``root`` (default: ``storage.study_dir``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Worker(space, storage, url, root or study_dir(url, space.study.name), tag, position).run(timeout)

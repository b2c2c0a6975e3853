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
from search.budget import Heartbeat, ask_within, claim_worker, used
from search.progress import EpochProgress, TrialLine, arm_label
from search.remote import RemoteState, drop
from search.pruners import make_pruner
from search.samplers import Grid, make_sampler
from search.space import Space
from search.storage import arm_dir, artifact_store, cause, fail_stale, heartbeat_enabled, study_dir
from search.study import create_study
from search.trial import Outcome, TrialRecord, directories, drop_checkpoints, finish, run_trial, trial_dir
from trainer import stop
from trainer.logs import logger
from trainer.errors import UserError
from trainer.fit import EpochReport


log = logger(__name__)
POLL = 1.0  # seconds between a waiting worker's looks at the others' trials: it exits within a second of them


def _others_running(study: optuna.Study) -> bool:
    """Other workers' trials still RUNNING, where heartbeats can tell whether their worker died."""
    return heartbeat_enabled(compat.storage(study)) and bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _exhausted(study: optuna.Study) -> bool:
    return isinstance(study.sampler, Grid) and study.sampler.is_exhausted(study) and not study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,))


class Arm:
    """One study of a search (the heads arm, the control arm) as a worker runs it: its sampler on this
    worker's seed stream, its pruner, its trial files and artifacts."""

    def __init__(self, space: Space, storage: optuna.storages.BaseStorage, url: str, root: Path) -> None:
        self.space, self.root = space, root
        self.study = create_study(space, storage, root)
        self.index = claim_worker(self.study, storage, url)
        self.study.sampler = make_sampler(space, self.index)
        self.study.pruner = make_pruner(space)
        self.artifacts = artifact_store(self.study.user_attrs["artifacts"])
        self.announced = False

    def share(self) -> float:
        """How much of its budget is used: the worker asks the arm that is furthest behind."""
        return used(self.study.get_trials(deepcopy=False)) / self.space.study.n_trials


class Worker:
    """One process's share of a search: ask (under the budget lock) from the arm furthest behind its budget,
    train, tell, until every arm's budget is met. Both arms thus advance together: a search cut short by its
    timeout still compares them."""

    def __init__(self, arms: list[Space], storage: optuna.storages.BaseStorage, url: str, root: Path,
                 tag: str = "", position: int = 0) -> None:
        self.storage, self.url, self.tag = storage, url, tag
        self.arms = [Arm(space, storage, url, arm_dir(root, arms[0].study.name, space.study.name)) for space in arms]
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.epochs, self.line = EpochProgress(tag, position), TrialLine(tag)

    def say(self, text: str) -> None:
        log.info(f"{self.tag}{text}")

    def recover(self, arm: Arm) -> None:
        """Fail and queue again the arm's trials whose worker died; drop those whose retries are used up."""
        s = arm.space.study
        queued, exhausted = fail_stale(arm.study)
        if queued:
            self.say(f"{s.name}: trials {queued} stopped beating (their worker died): failed, and queued again with "
                     f"the same params (up to study.max_retry={s.max_retry} times)")
        if exhausted:
            for number in exhausted:
                drop_checkpoints(trial_dir(arm.root, number))
                drop(arm.artifacts, arm.study.trials[number].user_attrs)
            self.say(f"{s.name}: trials {exhausted} stopped beating (their worker died) and used up their retries "
                     f"(study.max_retry={s.max_retry}): failed for good, checkpoints dropped")

    def ask(self) -> tuple[Arm, optuna.Trial] | tuple[None, None]:
        """A queued retry or a new trial of the arm furthest behind its budget that has one."""
        for arm in sorted(self.arms, key=Arm.share):
            if _exhausted(arm.study):
                continue
            trial = ask_within(arm.study, self.storage, self.url, arm.space.study.n_trials)
            if trial is not None:
                return arm, trial
        return None, None

    def run(self, timeout: float | None) -> list[optuna.Study]:
        """Ask, train and tell until every arm holds its ``study.n_trials`` trials or time is up."""
        started = time.perf_counter()
        while timeout is None or time.perf_counter() - started < timeout:
            stop.check()  # between trials: nothing of a trial is under way
            for arm in self.arms:
                self.recover(arm)
            stop.point("ask")
            stop.check()
            arm, trial = self.ask()
            if trial is None:
                if not any(_others_running(a.study) for a in self.arms):
                    break
                time.sleep(POLL)  # they finish, or go stale and are queued
                continue
            if not arm.announced:
                s = arm.space.study
                pruner = s.pruner + ("" if s.pruner == "none" else f" from epoch {arm.space.min_epochs()}")
                self.say(f"study {s.name!r}: running trials up to {s.n_trials} ({s.sampler}, pruner {pruner}); "
                         f"sampler seed stream {arm.index}, trial files in {arm.root / 'trials'}")
                arm.announced = True
            try:
                ended = self.run_one(arm, trial)
            except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:
                raise UserError(f"storage {self.url}: cannot write ({cause(err)}); {arm_label(arm.study)}trial "
                                f"{trial.number} stays RUNNING until its heartbeat goes stale, and the next run "
                                f"retries it") from None
            self.line([a.study for a in self.arms], arm.study, ended)
        for arm in self.arms:
            if _exhausted(arm.study):
                self.say(f"study {arm.space.study.name!r}: grid exhausted: every point of the grid has run")
            elif not arm.announced:
                self.say(f"study {arm.space.study.name!r} already has {arm.space.study.n_trials} trials")
        return [a.study for a in self.arms]

    def run_one(self, arm: Arm, trial: optuna.Trial) -> FrozenTrial:
        """Train and end one asked trial. A stop signal, seen at a safe point from the ask to the last epoch's
        report, ends it through ``finish`` (FAIL, a copy queued that resumes from its last epoch) and raises
        ``Stopped``; one that comes later leaves it to end as it would, and the loop stops before the next."""
        study, space, single = arm.study, arm.space, len(arm.space.study.metrics) == 1
        stop.point("asked")
        frozen = compat.frozen(study, trial)
        directory, earlier = directories(arm.root, frozen)
        starts = frozen.user_attrs.get("starts", []) if earlier else []  # a retry inherits the original's attrs
        uploads = RemoteState(arm.artifacts, space.study.checkpoint_every, self.epochs.warn)

        def hook(record: TrialRecord, report: EpochReport, restored: bool) -> None:
            if single and not space.on_test:
                trial.report(record.values[0], report.epoch + 1)  # step = epochs trained
            if restored:
                return
            for key, value in record.attrs.items():
                trial.set_user_attr(key, value)
            uploads.upload(trial, directory, report.epoch + 1)
            if single and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {report.epoch + 1} epochs")

        with Heartbeat(self.storage, compat.trial_id(trial), trial.number):  # from before the first suggestion
            try:
                trial.set_user_attr("worker", self.name)
                stop.check()
                try:
                    values = space.values(trial)
                except Exception as err:  # noqa: BLE001 - a sampler that cannot draw fails this trial, not the worker
                    outcome = Outcome(TrialState.FAIL, [], fail_reason=f"cannot sample the params "
                                      f"({type(err).__name__}: {str(err)[:200]})")
                else:
                    outcome = run_trial(space, trial.number, values, directory, earlier, hook, self.epochs,
                                        starts, fetch=partial(uploads.fetch, frozen.user_attrs) if earlier else None)
            except KeyboardInterrupt:  # Stopped at a safe point, or a second Ctrl-C mid-computation
                signum = stop.requested() or signal.SIGINT  # the first stop says why
                why = stop.WHY[signum]
                finish(study, trial, Outcome(TrialState.FAIL, [], fail_reason=f"{why}; queued again",
                                             requeue=True), directory, arm.artifacts)
                self.say(f"trial {trial.number} {why}: queued again, resumes from {directory / 'last.pt'}")
                raise stop.Stopped(signum) from None
        ended = finish(study, trial, outcome, directory, arm.artifacts)
        problem = outcome.fail_reason if outcome.stop else ended.user_attrs.get("file_error")
        if problem:
            raise UserError(f"trial {trial.number}: {problem} (make {arm.root} writable, or free space there, "
                            f"then run the same command again)")
        return ended


def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None,
        root: Path | None = None, tag: str = "", position: int = 0) -> list[optuna.Study]:
    """Top each arm of the search (``Space.arms``) up to its ``study.n_trials`` trials (all workers together)
    with this process; trial files go under ``root`` (default: ``storage.study_dir``) and its companions."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    arms = space.arms()
    return Worker(arms, storage, url, root or study_dir(url, space.study.name), tag, position).run(timeout)

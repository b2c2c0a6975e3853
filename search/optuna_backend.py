"""Run a space file as an Optuna study: sampler and pruner from YAML, a study-wide trial budget."""

from __future__ import annotations

import sys
import time
import warnings
from typing import TextIO

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search.budget import Heartbeat, ask_within
from search.objective import Objective
from search.space import Space, grid
from search.storage import fail_stale, heartbeat_enabled

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyMismatchError(ValueError):
    """The stored study was created with other directions than the space file asks for."""


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the space: a quarter of the budget, 3 to Optuna's default 10."""
    return min(10, max(3, n_trials // 4))


def make_sampler(space: Space) -> BaseSampler:
    s = space.study
    if s.sampler == "tpe":
        # Optuna's 10 random start-up trials would leave a 12-trial study 2 model-guided ones.
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup_trials(s.n_trials))
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    return optuna.samplers.GridSampler(grid(space.params), seed=s.seed)


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    """Steps are epochs trained; no pruner decides before ``space.min_epochs()`` of them."""
    epochs, first = space.config({}).optim.epochs, space.min_epochs()
    if space.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=first)
    if space.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=epochs, reduction_factor=3)
    if space.study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.NopPruner()


def create_study(space: Space, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study once (or load it), recording the space's ``final`` overrides for export."""
    study = optuna.create_study(
        study_name=space.study.name,
        storage=storage,
        directions=space.study.directions,
        sampler=make_sampler(space),
        pruner=make_pruner(space),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != space.study.directions:
        raise StudyMismatchError(f"{space.path}: 'study.direction': the stored study {space.study.name!r} has "
                         f"{[d.name.lower() for d in study.directions]}")
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(space.study.metrics)  # optuna-dashboard shows these names
    study.set_user_attr("metrics", space.study.metrics)
    study.set_user_attr("final", space.final)
    study.set_user_attr("space_file", str(space.path))
    return study


def _others_running(study: optuna.Study, storage: optuna.storages.BaseStorage) -> bool:
    """Other workers' trials still RUNNING, where heartbeats can tell whether their worker died."""
    return heartbeat_enabled(storage) and bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


class Progress:
    """One line per finished trial: number, state, value, best so far, params."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.started = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        value = trial.values if trial.values and len(trial.values) > 1 else trial.value
        line = f"[{time.perf_counter() - self.started:6.0f}s] trial {trial.number} {trial.state.name.lower()}"
        if value is not None:
            line += f" value={_fmt(value)}"
        if trial.state == TrialState.PRUNED:
            line += f" after {trial.last_step} epochs"
        if "fail_reason" in trial.user_attrs:
            line += f" ({trial.user_attrs['fail_reason']})"
        try:
            best = study.best_trial if len(study.directions) == 1 else None
            line += f" | best={_fmt(best.value)} (trial {best.number})" if best else \
                f" | pareto front: {len(study.best_trials)} trials"
        except ValueError:
            pass
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        print(f"{line} | {done} finished | {params}", file=self.out or sys.stdout, flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None) -> optuna.Study:
    """Ask, train and tell until the study holds ``study.n_trials`` trials (all workers together) or time
    is up.

    The ask-and-tell loop (rather than ``study.optimize``) lets every ask happen under the budget lock.
    """
    study = create_study(space, storage)
    n_trials = space.study.n_trials
    objective, progress = Objective(space), Progress()
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    announced = False
    while timeout is None or time.perf_counter() - started < timeout:
        stale = fail_stale(storage, study)
        if stale:
            print(f"failed stale trials left RUNNING by a dead worker: {stale}", flush=True)
        trial = ask_within(study, storage, url, n_trials)
        if trial is None:
            if not _others_running(study, storage):
                break
            time.sleep(storage.get_heartbeat_interval())  # wait: they finish, or go stale and are failed
            continue
        if not announced:
            pruner = space.study.pruner + ("" if space.study.pruner == "none" else f" from epoch {space.min_epochs()}")
            print(f"study {space.study.name!r}: running trials up to {n_trials} ({space.study.sampler}, "
                  f"pruner {pruner})", flush=True)
            announced = True
        with Heartbeat(storage, trial):
            try:
                frozen = study.tell(trial, objective(trial))
            except optuna.TrialPruned:
                frozen = study.tell(trial, state=TrialState.PRUNED)
            except BaseException as err:  # Ctrl-C, out of memory, ...: never leave it RUNNING
                trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
                study.tell(trial, state=TrialState.FAIL)
                raise
        progress(study, frozen)
    if not announced:
        print(f"study {space.study.name!r} already has {n_trials} trials", flush=True)
    return study

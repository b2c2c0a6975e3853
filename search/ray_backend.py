"""Run a space file with Ray Tune: many workers, one machine or a cluster, trials in the same Optuna study.

Ray's ``OptunaSearch`` samples from the study (only this driver writes to the storage); Tune runs the
trials in parallel and its scheduler stops weak ones (``study.pruner``: hyperband -> HyperBand,
successive_halving -> ASHA, median -> median stopping, none -> FIFO). Ray would record a trial its
scheduler stopped as COMPLETE with a partial value; here it is told PRUNED and marked
``truncated``, so export and ``study.best_trial`` never pick it over a full run.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # keep relative data paths working in trials

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search.objective import TrialRecord  # noqa: E402
from search.optuna_backend import FINISHED, create_study, make_sampler  # noqa: E402
from search.space import Param, Space, suggest  # noqa: E402
from trainer.fit import DivergedError, EpochReport, fit  # noqa: E402


def _scheduler(space: Space, epochs: int):
    """Tune counts epochs trained (``training_iteration``); ``min_epochs`` is the grace period."""
    pruner = space.study.pruner
    if pruner == "hyperband":
        return HyperBandScheduler(max_t=epochs)
    if pruner == "successive_halving":
        return ASHAScheduler(max_t=epochs, grace_period=space.min_epochs(), reduction_factor=3)
    if pruner == "median":
        return MedianStoppingRule("training_iteration", grace_period=space.min_epochs(), min_samples_required=3)
    return FIFOScheduler()


def _trainable(space: Space):
    """The Tune function trainable: builds the config from the sampled values and reports each epoch."""

    def train(params: dict[str, Any]) -> None:
        cfg = space.config(params["values"])
        record = TrialRecord(space.study.metrics)

        def on_epoch(report: EpochReport) -> None:
            values = dict(zip(space.study.metrics, record.update(report)))
            # nested attrs travel as JSON strings: Tune would flatten dicts and its loggers reject lists
            tune.report({**values, "epochs_run": report.epoch + 1, "epochs_total": cfg.optim.epochs,
                         "attrs": json.dumps({"config": cfg.to_dict(), **record.attrs})})

        try:
            fit(cfg, on_epoch)
        except DivergedError as err:
            tune.report({m: float("nan") for m in space.study.metrics} | {"attrs": json.dumps({"fail_reason": str(err)})})

    return train


class StudySearch(OptunaSearch):
    """OptunaSearch that records user attrs and tells scheduler-stopped trials as PRUNED."""

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("backend", "ray")
        return params

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or not result or error:
            if ot_trial is not None and error:
                ot_trial.set_user_attr("fail_reason", "the Ray trial raised an error")
            return super().on_trial_complete(trial_id, result, error)
        attrs = json.loads(result.get("attrs", "{}"))
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        if "fail_reason" not in attrs and result.get("epochs_run", 0) < result.get("epochs_total", 0):
            ot_trial.set_user_attr("truncated", True)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)


class DefineByRun:
    """The space as Ray's define-by-run function (a class, so Tune can pickle the searcher)."""

    def __init__(self, params: list[Param]) -> None:
        self.params = params

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        return {"values": suggest(trial, self.params)}


def _searcher(space: Space, storage: optuna.storages.BaseStorage) -> StudySearch:
    modes = ["max" if d == "maximize" else "min" for d in space.study.directions]
    metrics = space.study.metrics
    return StudySearch(
        space=DefineByRun(space.params),
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=make_sampler(space),
        study_name=space.study.name,
        storage=storage,
    )


def fail_orphans(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials of an earlier Ray driver (the driver is the only writer, so they are dead)."""
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("backend") == "ray"]
    for t in orphans:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return [t.number for t in orphans]


def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None,
        address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
        max_concurrent: int = 2) -> optuna.Study:
    """Top the study up to ``study.n_trials`` finished trials with Ray Tune."""
    study = create_study(space, storage)
    n_trials = space.study.n_trials
    orphans = fail_orphans(study)
    if orphans:
        print(f"failed trials left RUNNING by an earlier Ray driver: {orphans}", flush=True)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    if remaining <= 0:
        print(f"study {space.study.name!r} already has {n_trials} trials", flush=True)
        return study
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **({} if address else {"num_cpus": max(1, os.cpu_count() or 1)}))

    class Report(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            r = trial.last_result or {}
            values = ", ".join(f"{m}={r[m]:.4g}" for m in space.study.metrics if isinstance(r.get(m), float))
            params = ", ".join(f"{k}={v}" for k, v in trial.config["values"].items())
            print(f"ray trial {trial.trial_id} done after {r.get('epochs_run', 0)}/{epochs} epochs: {values} | "
                  f"{params}", flush=True)

    epochs = space.config({}).optim.epochs
    single = len(space.study.metrics) == 1
    tuner = tune.Tuner(
        tune.with_resources(_trainable(space), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, storage),
            scheduler=_scheduler(space, epochs) if single else None,
            metric=space.study.metrics[0] if single else None,
            mode=("max" if space.study.directions[0] == "maximize" else "min") if single else None,
            num_samples=remaining,
            max_concurrent_trials=max_concurrent,
            time_budget_s=timeout,
        ),
        run_config=tune.RunConfig(name=space.study.name, storage_path=os.path.abspath("studies/ray"),
                                  verbose=0, callbacks=[Report()]),
    )
    print(f"study {space.study.name!r}: {remaining} more trials on Ray ({space.study.sampler}, "
          f"scheduler for pruner {space.study.pruner}, {max_concurrent} at a time)", flush=True)
    try:
        tuner.fit()
    finally:
        ray.shutdown()
    return study

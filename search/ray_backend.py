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
import shutil
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # keep relative data paths working in trials

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search.budget import claim_worker, is_baseline, used  # noqa: E402
from search.progress import EpochProgress  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.space import Param, Space, suggest  # noqa: E402
from search.storage import artifact_store, study_dir  # noqa: E402
from search.study import BASELINE, create_study  # noqa: E402
from search.trial import TrialRecord, directories, drop_checkpoints, keep_artifacts, run_trial, trial_dir  # noqa: E402
from trainer.checkpoint import STATE_FILE  # noqa: E402
from trainer.fit import EpochReport  # noqa: E402


SCHEDULERS = {  # study.pruner -> Tune scheduler; (min_epochs, epochs) -> scheduler counting epochs trained
    "hyperband": lambda first, epochs: HyperBandScheduler(max_t=epochs),
    "successive_halving": lambda first, epochs: ASHAScheduler(max_t=epochs, grace_period=first, reduction_factor=3),
    "median": lambda first, epochs: MedianStoppingRule("training_iteration", grace_period=first,
                                                       min_samples_required=3),
    "none": lambda first, epochs: FIFOScheduler(),
}


def _scheduler(space: Space, epochs: int):
    """Tune counts epochs trained (``training_iteration``); ``min_epochs`` is the grace period."""
    return SCHEDULERS[space.study.pruner](space.min_epochs(), epochs)


def _trainable(space: Space):
    """The Tune function trainable: the shared trial runner, a ``tune.Checkpoint`` after every epoch.

    A trial that Tune pauses (HyperBand) or restarts after its actor died (``FailureConfig``) gets its
    latest checkpoint back here and continues from that epoch.
    """

    def train(config: dict[str, Any]) -> None:
        directory = Path(config["directory"])
        directory.mkdir(parents=True, exist_ok=True)
        drop_checkpoints(directory)  # Tune's checkpoint, where there is one, is this trial's resume state
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as saved:
                shutil.copyfile(Path(saved) / STATE_FILE, directory / STATE_FILE)

        def hook(record: TrialRecord, report: EpochReport, restored: bool) -> None:
            if restored:  # Tune restored its own count of epochs with the checkpoint
                return
            values = dict(zip(space.study.metrics, record.values))
            epochs = record.attrs["config"]["optim"]["epochs"]
            # nested attrs travel as JSON strings: Tune would flatten dicts and its loggers reject lists
            tune.report({**values, "epochs_run": report.epoch + 1, "epochs_total": epochs,
                         "attrs": json.dumps(record.attrs)}, checkpoint=tune.Checkpoint.from_directory(directory))

        outcome = run_trial(space, config["trial"], config["values"], directory,
                            [Path(p) for p in config["earlier"]], hook, EpochProgress(), keep_own=True)
        if outcome.fail_reason:
            tune.report({m: float("nan") for m in space.study.metrics}
                        | {"attrs": json.dumps({**outcome.attrs, "fail_reason": outcome.fail_reason})})

    return train


class StudySearch(OptunaSearch):
    """OptunaSearch that gives each Tune trial its Optuna trial's directory, records user attrs, keeps
    the artifacts of completed trials and tells scheduler-stopped trials as PRUNED."""

    def __init__(self, *args: Any, root: Path, artifacts: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root, self.artifacts = root, artifacts
        self.last: dict[str, dict] = {}  # Tune may complete a trial it stopped with result=None
        self.starts: dict[str, list[int]] = {}  # each (re)start of a Tune trial, across pauses

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.last[trial_id] = result
        start = json.loads(result.get("attrs", "{}")).get("starts", [None])[-1]
        if start is not None and result.get("epochs_run") == start + 1:  # the first epoch of a (re)start
            self.starts.setdefault(trial_id, []).append(start)
        super().on_trial_result(trial_id, result)

    def suggest(self, trial_id: str) -> dict | None:
        with warnings.catch_warnings():  # Tune, not heartbeats, tracks whether Ray trials are alive
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("backend", "ray")
        directory, earlier = directories(self.root, self._ot_study._storage.get_trial(ot_trial._trial_id))
        return {**params, "trial": ot_trial.number, "directory": str(directory.resolve()),
                "earlier": [str(p.resolve()) for p in earlier]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        directory = trial_dir(self.root, ot_trial.number)
        result = result or self.last.pop(trial_id, {})
        attrs = json.loads(result.get("attrs", "{}"))
        if trial_id in self.starts:
            attrs["starts"] = self.starts.pop(trial_id)
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        if error or "fail_reason" in attrs:
            if error:
                ot_trial.set_user_attr("fail_reason", "the Ray trial raised an error (see its Ray log)")
            drop_checkpoints(directory)
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif result.get("epochs_run", 0) < result.get("epochs_total", 0):
            ot_trial.set_user_attr("truncated", True)
            drop_checkpoints(directory)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        else:
            keep_artifacts(self.artifacts, ot_trial, directory)
            (directory / STATE_FILE).unlink(missing_ok=True)
            return super().on_trial_complete(trial_id, result, error)
        self._completed_trials.add(trial_id)
        return None


class DefineByRun:
    """The space as Ray's define-by-run function (a class, so Tune can pickle the searcher)."""

    def __init__(self, params: list[Param]) -> None:
        self.params = params

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        return {"values": BASELINE if is_baseline(trial) else suggest(trial, self.params)}


def _searcher(space: Space, storage: optuna.storages.BaseStorage, url: str, study: optuna.Study,
              root: Path) -> StudySearch:
    modes = ["max" if d == "maximize" else "min" for d in space.study.directions]
    metrics = space.study.metrics
    return StudySearch(
        space=DefineByRun(space.params),
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=make_sampler(space, claim_worker(study, storage, url)),  # the driver is one more worker
        study_name=space.study.name,
        storage=storage,
        root=root,
        artifacts=artifact_store(study.user_attrs["artifacts"]),
    )


def requeue_orphans(study: optuna.Study, max_retry: int) -> list[int]:
    """Fail the RUNNING trials of an earlier Ray driver (the driver is the only writer, so they are dead)
    and queue each again with the same params, to resume from its checkpoint."""
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("backend") == "ray"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        for t in orphans:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            retry(study, study._storage.get_trial(t._trial_id))
    return [t.number for t in orphans]


def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None,
        address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
        max_concurrent: int = 2, root: Path | None = None) -> optuna.Study:
    """Top the study up to ``study.n_trials`` trials with Ray Tune (budget as in ``search/budget.py``)."""
    root = root or study_dir(url, space.study.name)
    study = create_study(space, storage, root)
    n_trials = space.study.n_trials
    orphans = requeue_orphans(study, space.study.max_retry)
    if orphans:
        print(f"trials {orphans} were left RUNNING by an earlier Ray driver: failed, and queued again", flush=True)
    trials = study.get_trials(deepcopy=False)
    remaining = n_trials - used(trials) + sum(t.state == TrialState.WAITING for t in trials)
    if remaining <= 0:
        print(f"study {space.study.name!r} already has {n_trials} trials", flush=True)
        return study
    ray.init(address=address, include_dashboard=False, configure_logging=False,
             **({} if address else {"num_cpus": max(1, os.cpu_count() or 1)}))

    class Report(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            r = trial.last_result or {}
            values = ", ".join(f"{m}={r[m]:.4g}" for m in space.study.metrics if isinstance(r.get(m), float))
            params = ", ".join(f"{k}={v}" for k, v in trial.config["values"].items())
            print(f"ray trial {trial.config['trial']} done after {r.get('epochs_run', 0)}/{epochs} epochs: "
                  f"{values} | {params}", flush=True)

    epochs = space.config({}).optim.epochs
    single = len(space.study.metrics) == 1
    scheduler = _scheduler(space, epochs) if single else None
    tuner = tune.Tuner(
        tune.with_resources(_trainable(space), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, storage, url, study, root),
            scheduler=scheduler,
            metric=space.study.metrics[0] if single else None,
            mode=("max" if space.study.directions[0] == "maximize" else "min") if single else None,
            num_samples=remaining,
            # HyperBand pauses trials until its bracket fills; paused trials count against a concurrency
            # limit, which then starves the bracket for ever: there, resources alone bound parallelism
            max_concurrent_trials=None if isinstance(scheduler, HyperBandScheduler) else max_concurrent,
            time_budget_s=timeout,
        ),
        run_config=tune.RunConfig(
            name=space.study.name, storage_path=str((root / "ray").resolve()),
            verbose=0, callbacks=[Report()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=space.study.max_retry),  # restarts resume
        ),
    )
    print(f"study {space.study.name!r}: {remaining} more trials on Ray ({space.study.sampler}, "
          f"scheduler for pruner {space.study.pruner}, {max_concurrent} at a time)", flush=True)
    try:
        tuner.fit()
    finally:
        ray.shutdown()
    return study

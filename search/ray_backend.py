"""Run a space file with Ray Tune: many workers, one machine or a cluster, trials in the same Optuna study.

Ray's ``OptunaSearch`` samples from the study (only this driver writes to the storage); Tune runs the
trials in parallel, each through the shared trial runner (``search/trial.py``), and its scheduler stops
weak ones (``study.pruner``, from the one registry in ``search/pruners.py``). Every Tune trial ends in
``search.trial.finish``, as the Optuna loop's do. Ray would record a trial its scheduler stopped as
COMPLETE with a partial value; here it is told PRUNED and marked ``truncated``, so export and
``study.best_trial`` never pick it over a full run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # keep relative data paths working in trials

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import HyperBandScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search import compat  # noqa: E402
from search.budget import claim_worker, is_baseline, remaining  # noqa: E402
from search.progress import EpochProgress  # noqa: E402
from search.pruners import make_scheduler  # noqa: E402
from search.retry import requeue  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.space import Param, Space, suggest  # noqa: E402
from search.storage import artifact_store, study_dir  # noqa: E402
from search.study import BASELINE, create_study  # noqa: E402
from search.trial import Outcome, TrialRecord, directories, finish, run_trial, trial_dir  # noqa: E402
from trainer.checkpoint import STATE_FILE  # noqa: E402
from trainer.fit import EpochReport  # noqa: E402


def _trainable(space: Space):
    """The Tune function trainable: the shared trial runner, a ``tune.Checkpoint`` after every epoch.

    A trial that Tune pauses (HyperBand) or restarts after its actor died (``FailureConfig``) gets its
    latest checkpoint back here and continues from that epoch.
    """

    def train(config: dict[str, Any]) -> None:
        directory = Path(config["directory"])
        checkpoint = tune.get_checkpoint()  # where there is one, it is this trial's resume state
        if checkpoint:
            directory.mkdir(parents=True, exist_ok=True)
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
                            [Path(p) for p in config["earlier"]], hook, EpochProgress(), keep_own=bool(checkpoint))
        if outcome.fail_reason:
            tune.report({m: float("nan") for m in space.study.metrics}
                        | {"attrs": json.dumps({**outcome.attrs, "fail_reason": outcome.fail_reason})})

    return train


class StudySearch(OptunaSearch):
    """OptunaSearch that gives each Tune trial its Optuna trial's directory and ends every trial through
    ``search.trial.finish`` (attrs, artifacts, checkpoints; scheduler-stopped trials as PRUNED)."""

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
        ot_trial = compat.searcher_trial(self, trial_id)
        ot_trial.set_user_attr("backend", "ray")
        directory, earlier = directories(self.root, compat.frozen(compat.searcher_study(self), ot_trial))
        return {**params, "trial": ot_trial.number, "directory": str(directory.resolve()),
                "earlier": [str(p.resolve()) for p in earlier]}

    def outcome(self, trial_id: str, result: dict, error: bool) -> Outcome:
        """What the Tune trial's last result says, as the Optuna loop's runner would have returned it."""
        attrs = json.loads(result.get("attrs", "{}"))
        if trial_id in self.starts:
            attrs["starts"] = self.starts.pop(trial_id)
        values = [result.get(m, math.nan) for m in self.metric] if isinstance(self.metric, list) else \
            [result.get(self.metric, math.nan)]
        if error or "fail_reason" in attrs:
            reason = attrs.pop("fail_reason", "the Ray trial raised an error (see its Ray log)")
            return Outcome(TrialState.FAIL, values, attrs, reason)
        if result.get("epochs_run", 0) < result.get("epochs_total", 0):
            return Outcome(TrialState.PRUNED, values, {**attrs, "truncated": True})
        return Outcome(TrialState.COMPLETE, values, attrs)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = compat.searcher_trial(self, trial_id)
        if ot_trial is None or compat.searcher_done(self, trial_id):
            return super().on_trial_complete(trial_id, result, error)
        outcome = self.outcome(trial_id, result or self.last.pop(trial_id, {}), error)
        finish(compat.searcher_study(self), ot_trial, outcome, trial_dir(self.root, ot_trial.number), self.artifacts)
        compat.searcher_done(self, trial_id, done=True)
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
    """Queue again the RUNNING trials of an earlier Ray driver (the driver is the only writer, so they are
    dead), to resume from their checkpoints."""
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("backend") == "ray"]
    for t in orphans:
        requeue(study, t, max_retry)
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
    more = remaining(study.get_trials(deepcopy=False), n_trials)
    if more <= 0:
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
    scheduler = make_scheduler(space) if single else None
    tuner = tune.Tuner(
        tune.with_resources(_trainable(space), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, storage, url, study, root),
            scheduler=scheduler,
            metric=space.study.metrics[0] if single else None,
            mode=("max" if space.study.directions[0] == "maximize" else "min") if single else None,
            num_samples=more,
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
    print(f"study {space.study.name!r}: {more} more trials on Ray ({space.study.sampler}, "
          f"scheduler for pruner {space.study.pruner}, {max_concurrent} at a time)", flush=True)
    try:
        tuner.fit()
    finally:
        ray.shutdown()
    return study

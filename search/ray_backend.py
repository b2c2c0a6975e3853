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
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # keep relative data paths working in trials
os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each trial's epoch lines are its own, not repeats of another's
os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C sets trainer.stop's flag, as SIGTERM does

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import HyperBandScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search import compat, pbt  # noqa: E402
from search.budget import claim_worker, remaining  # noqa: E402
from search.progress import EpochProgress  # noqa: E402
from search.pruners import make_scheduler  # noqa: E402
from search.retry import requeue  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.space import Space  # noqa: E402
from search.storage import arm_dir, artifact_store, study_dir  # noqa: E402
from search.study import create_study  # noqa: E402
from search.trial import Outcome, TrialRecord, directories, finish, run_trial, trial_dir  # noqa: E402
from trainer import stop  # noqa: E402
from trainer.logs import logger, show  # noqa: E402
from trainer.checkpoint import STATE_FILE, load_history  # noqa: E402
from trainer.files import atomic_write  # noqa: E402
from trainer.fit import EpochReport  # noqa: E402


log = logger(__name__)
PBT_KEEP = 4  # checkpoints kept per PBT member
OWN = ("trial", "directory", "earlier", "resume")  # a Tune trial's Optuna trial, folders, and whether it resumes


def _members(config: dict[str, Any]) -> Path:
    return Path(config["directory"]).parents[1] / "ray" / "members"


def _own(config: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """``config`` with Tune trial ``trial_id``'s own ``OWN`` keys. PBT hands a member that copies another
    the other's whole config, these keys included, so each Tune trial keeps its own in
    ``<study dir>/ray/members/<Tune trial id>.json`` from its first start (Tune's ids survive restarts
    and experiment restores); the driver reads the same files."""
    path = _members(config) / f"{trial_id}.json"
    if path.exists():
        return {**config, **json.loads(path.read_text())}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({k: config.get(k) for k in OWN}).encode())  # the driver may read it meanwhile
    return config


def exit_quietly(unraisable: Any) -> None:
    """``sys.unraisablehook`` in a trial's actor. Ray's SIGTERM handler there (a node's shutdown, a
    preemption) raises ``SystemExit`` at whatever line the main thread is on; inside a finalizer Python
    would print it as a traceback and go on training. The actor ends as Ray meant, without one (its
    checkpoints are written atomically, so nothing is cut midway)."""
    if issubclass(unraisable.exc_type, SystemExit):
        code = unraisable.exc_value.code
        os._exit(code if isinstance(code, int) else 1)
    sys.__unraisablehook__(unraisable)


def _trainable(space: Space):
    """The Tune function trainable: the shared trial runner, a ``tune.Checkpoint`` after every epoch.

    A trial that Tune pauses (HyperBand) or restarts after its actor died (``FailureConfig``) gets its
    latest checkpoint back here and continues from that epoch.
    """

    def train(config: dict[str, Any]) -> None:
        show()  # a Ray worker's own process: its messages reach the driver's output through Ray's
        sys.unraisablehook = exit_quietly
        if Path(config["cwd"]).is_dir():  # relative paths (data.root) mean what they mean to the driver; Ray's
            os.chdir(config["cwd"])  # workers start in folders of their own
        config = _own(config, tune.get_context().get_trial_id())
        directory, number = Path(config["directory"]), config["trial"]
        checkpoint = tune.get_checkpoint()  # this trial's resume state, or (PBT) the member it copies
        resume = bool(checkpoint) or bool(config.get("resume"))  # a PBT member of a dead driver: its last.pt
        member = pbt.Member(number)  # a new one: files in its folder are another study's
        if checkpoint:
            directory.mkdir(parents=True, exist_ok=True)
            with checkpoint.as_directory() as saved:
                atomic_write(directory / STATE_FILE, (Path(saved) / STATE_FILE).read_bytes())
                member = pbt.Member.restored(Path(saved), directory, number, len(load_history(directory)),
                                             config["values"])
        elif resume:
            member = pbt.Member.restored(directory, directory, number, 0, {})

        def hook(record: TrialRecord, report: EpochReport, restored: bool) -> None:
            epochs = record.attrs["config"]["optim"]["epochs"]
            if restored and report.epoch + 1 < epochs:  # Tune restored its own count of epochs with the
                return  # checkpoint; a state that holds every epoch (a PBT copy at the end) reports its last
            if space.study.scheduler is not None:
                record.attrs.update(member.attrs(record.history))
                member.save(directory)
            values = dict(zip(space.study.metrics, record.values))
            # nested attrs travel as JSON strings: Tune would flatten dicts and its loggers reject lists
            # a retraining's last result is its test score, one after its last epoch: until then it is not done
            tune.report({**values, "epochs_run": report.epoch + 1, "epochs_total": epochs + space.on_test,
                         "attrs": json.dumps(record.attrs)}, checkpoint=tune.Checkpoint.from_directory(directory))

        outcome = run_trial(space, number, config["values"], directory,
                            [Path(p) for p in config["earlier"]], hook, EpochProgress(), keep_own=resume)
        if outcome.fail_reason:
            tune.report({m: float("nan") for m in space.study.metrics}
                        | {"epochs_run": outcome.attrs.get("epochs_run", 0),
                           "attrs": json.dumps({**outcome.attrs, "fail_reason": outcome.fail_reason})})
        elif space.on_test:  # the score comes after the last epoch: one result more
            done = outcome.attrs["epochs_run"] + 1
            tune.report(dict(zip(space.study.metrics, outcome.values)) | {
                "epochs_run": done, "epochs_total": done, "attrs": json.dumps(outcome.attrs)})

    return train


class Ending:
    """What a Tune trial's results say when it ends, as the Optuna loop's runner would have returned it;
    shared by the searcher (every sampler but PBT) and the PBT members' callback."""

    def __init__(self, metric: str | list[str]) -> None:
        self.metric = metric
        self.last: dict[str, dict] = {}  # Tune may complete a trial it stopped with result=None
        self.starts: dict[str, list[int]] = {}  # each (re)start of a Tune trial, across pauses

    def seen(self, trial_id: str, result: dict) -> None:
        self.last[trial_id] = result
        start = json.loads(result.get("attrs", "{}")).get("starts", [None])[-1]
        if start is not None and result.get("epochs_run") == start + 1:  # the first epoch of a (re)start
            self.starts.setdefault(trial_id, []).append(start)

    def outcome(self, trial_id: str, result: dict | None, error: bool) -> Outcome:
        result = result or self.last.pop(trial_id, {})
        attrs = json.loads(result.get("attrs", "{}"))
        if trial_id in self.starts:
            attrs["starts"] = self.starts.pop(trial_id)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m, math.nan) for m in metrics]
        if error or "fail_reason" in attrs:
            reason = attrs.pop("fail_reason", "the Ray trial raised an error (see its Ray log)")
            return Outcome(TrialState.FAIL, values, attrs, reason)
        if result.get("epochs_run", 0) < result.get("epochs_total", 0):
            return Outcome(TrialState.PRUNED, values, {**attrs, "truncated": True})
        return Outcome(TrialState.COMPLETE, values, attrs)


class StudySearch(OptunaSearch):
    """OptunaSearch that gives each Tune trial its Optuna trial's directory and ends every trial through
    ``search.trial.finish`` (attrs, artifacts, checkpoints; scheduler-stopped trials as PRUNED)."""

    def __init__(self, *args: Any, root: Path, artifacts: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root, self.artifacts = root, artifacts
        self.ending = Ending(self.metric)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ending.seen(trial_id, result)
        super().on_trial_result(trial_id, result)
        stop.point("result")  # the driver has an epoch's result

    def suggest(self, trial_id: str) -> dict | None:
        with warnings.catch_warnings():  # Tune, not heartbeats, tracks whether Ray trials are alive
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            params = super().suggest(trial_id)
        ot_trial = compat.searcher_trial(self, trial_id)
        ot_trial.set_user_attr("backend", "ray")
        directory, earlier = directories(self.root, compat.frozen(compat.searcher_study(self), ot_trial))
        return {**params, "trial": ot_trial.number, "directory": str(directory.resolve()),
                "earlier": [str(p.resolve()) for p in earlier], "cwd": os.getcwd()}

    def end_stopped(self, why: str) -> list[int]:
        """After a stop signal, end each trial that Tune stopped without ending it: COMPLETE if its last
        epoch was reported, else FAIL with ``why`` and a copy queued that resumes from its last.pt. Their
        numbers."""
        ended = []
        for tune_id in compat.searcher_tune_ids(self):
            if compat.searcher_done(self, tune_id):
                continue
            reported = tune_id in self.ending.last
            outcome = self.ending.outcome(tune_id, None, False)
            if not reported or outcome.state == TrialState.PRUNED:
                outcome = Outcome(TrialState.FAIL, outcome.values, outcome.attrs, f"{why}; queued again", requeue=True)
            self.on_trial_end(tune_id, outcome)
            ended.append(compat.searcher_trial(self, tune_id).number)
        return ended

    def on_trial_end(self, trial_id: str, outcome: Outcome) -> None:
        ot_trial = compat.searcher_trial(self, trial_id)
        finish(compat.searcher_study(self), ot_trial, outcome, trial_dir(self.root, ot_trial.number), self.artifacts)
        compat.searcher_done(self, trial_id, done=True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = compat.searcher_trial(self, trial_id)
        if ot_trial is None or compat.searcher_done(self, trial_id):
            return super().on_trial_complete(trial_id, result, error)
        self.on_trial_end(trial_id, self.ending.outcome(trial_id, result, error))
        return None


class Members(tune.Callback):
    """PBT's members in the study (Tune runs PBT without a searcher): each result is an intermediate
    value of the member's Optuna trial, and each member ends through ``search.trial.finish``."""

    def __init__(self, study: optuna.Study, root: Path, artifacts: Any, metric: str) -> None:
        self.study, self.root, self.artifacts, self.metric = study, root, artifacts, metric
        self.ending = Ending(metric)

    def number(self, trial: Any) -> int:
        return _own(trial.config, trial.trial_id)["trial"]

    def trial(self, trial: Any) -> optuna.Trial:
        return compat.live_trial(self.study, self.number(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.ending.seen(trial.trial_id, result)
        if isinstance(result.get(self.metric), float) and "epochs_run" in result:
            with warnings.catch_warnings():  # after a copy, a member may report an epoch it reported before
                warnings.simplefilter("ignore")
                self.trial(trial).report(result[self.metric], result["epochs_run"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, trial.last_result, False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, trial.last_result, True)

    def end(self, trial: Any, result: dict | None, error: bool) -> None:
        number = self.number(trial)
        if self.study.trials[number].state.is_finished():  # a restored experiment ends a trial once
            return
        finish(self.study, self.trial(trial), self.ending.outcome(trial.trial_id, result, error),
               trial_dir(self.root, number), self.artifacts)


class DefineByRun:
    """The space as Ray's define-by-run function (a class, so Tune can pickle the searcher)."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        return {"values": self.space.values(trial)}


def _searcher(space: Space, storage: optuna.storages.BaseStorage, url: str, study: optuna.Study,
              root: Path) -> StudySearch:
    modes = ["max" if d == "maximize" else "min" for d in space.study.directions]
    metrics = space.study.metrics
    return StudySearch(
        space=DefineByRun(space),
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
        compat.storage(study).set_trial_user_attr(compat.trial_id(t), "fail_reason",
                                                  "its Ray driver died; queued again")
        requeue(study, t, max_retry)
    return [t.number for t in orphans]


class StopSignal(tune.Stopper):
    """Ends the whole experiment at the stop flag (``trainer.stop``), checked between Tune's steps; with
    ``epochs``, also each trial after that many epochs."""

    def __init__(self, epochs: int | None = None) -> None:
        self.epochs = epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.epochs is not None and result.get("epochs_run", 0) >= self.epochs

    def stop_all(self) -> bool:
        return bool(stop.requested())




def run(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None,
        address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
        max_concurrent: int = 2, root: Path | None = None) -> list[optuna.Study]:
    """Each arm of the search (``Space.arms``) in turn on one Ray (Tune runs one experiment at a time, so
    here the heads arm goes first, and ``timeout`` bounds both together): top its study up to
    ``study.n_trials`` trials (budget as in ``search/budget.py``), or with ``study.scheduler: pbt`` train one
    population."""
    root = root or study_dir(url, space.study.name)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return [run_arm(arm, storage, url, None if deadline is None else max(1.0, deadline - time.monotonic()),
                        address, cpus_per_trial, gpus_per_trial, max_concurrent,
                        arm_dir(root, space.study.name, arm.study.name)) for arm in space.arms()]
    finally:
        ray.shutdown()


def run_arm(space: Space, storage: optuna.storages.BaseStorage, url: str, timeout: float | None, address: str | None,
            cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int, root: Path) -> optuna.Study:
    """One arm of the search on Ray Tune."""
    study = create_study(space, storage, root)
    s, pbt_run = space.study, space.study.scheduler is not None
    experiment = (root / "ray" / s.name).resolve()
    # a population's members left RUNNING by a dead driver go on from their own last.pt (Tune's experiment
    # restore may point at a checkpoint it deleted just before the driver died); other trials are queued again
    survivors = pbt.survivors(study, root) if pbt_run else []
    if survivors:
        log.info(f"study {s.name!r}: the population's driver died; members {[m['trial'] for m in survivors]} go "
                 f"on from their last checkpoints")
    orphans = [] if pbt_run else requeue_orphans(study, s.max_retry)
    if orphans:
        log.info(f"trials {orphans} were left RUNNING by an earlier Ray driver: failed, and queued again")
    more = remaining(study.get_trials(deepcopy=False), s.population if pbt_run else s.n_trials) + len(survivors)
    if more <= 0:
        log.info(f"study {s.name!r} already has {s.population if pbt_run else s.n_trials} trials")
        return study
    _init(address)  # before the Tuner: it reads the cluster's resources
    epochs = space.config({}).optim.epochs
    single = len(s.metrics) == 1
    mode = ("max" if s.directions[0] == "maximize" else "min") if single else None
    artifacts = artifact_store(study.user_attrs["artifacts"])
    if pbt_run:
        study.sampler = make_sampler(space, claim_worker(study, storage, url))
        members = survivors + [pbt.tune_config(t.number, values, root) for t, values in
                               pbt.draw(study, space, more - len(survivors))]
        shutil.rmtree(experiment, ignore_errors=True)  # a dead driver's Tune state: the members carry on without it
        search_alg, scheduler = BasicVariantGenerator(points_to_evaluate=members), pbt.scheduler(space)
        # Tune takes the members' keys from here; each may take each member's value (else Tune warns)
        param_space = {k: tune.choice([m[k] for m in members]) for k in members[0] if k != "values"}
        param_space["values"] = {k: tune.choice([m["values"][k] for m in members]) for k in members[0]["values"]}
        callbacks = [Members(study, root, artifacts, s.metrics[0])]
        concurrent = None  # PBT compares members as they go: all of them train at once
        what = (f"a population of {more} on Ray ({s.scheduler.upper()} every {s.perturbation_interval} epochs, "
                f"{', '.join(p.key for p in space.params)})")
    else:
        search_alg, callbacks, param_space = _searcher(space, storage, url, study, root), [], None
        scheduler = make_scheduler(space) if single else None
        # HyperBand pauses trials until its bracket fills; paused trials count against a concurrency
        # limit, which then starves the bracket for ever: there, resources alone bound parallelism
        concurrent = None if isinstance(scheduler, HyperBandScheduler) else max_concurrent
        what = (f"{more} more trials on Ray ({s.sampler}, scheduler for pruner {s.pruner}, "
                f"{max_concurrent} at a time)")

    class Report(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            r = trial.last_result or {}
            values = ", ".join(f"{m}={r[m]:.4g}" for m in s.metrics if isinstance(r.get(m), float))
            params = ", ".join(f"{k}={v}" for k, v in trial.config["values"].items())
            number = _own(trial.config, trial.trial_id)["trial"]
            log.info(f"ray trial {number} done after {r.get('epochs_run', 0)}/{epochs} epochs: {values} | {params}")

    tuner = tune.Tuner(
        tune.with_resources(_trainable(space), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, metric=s.metrics[0] if single else None,
                                    mode=mode, num_samples=more, max_concurrent_trials=concurrent,
                                    time_budget_s=timeout,
                                    reuse_actors=True),  # another trial, a PBT copy, a resume: no new process
        run_config=tune.RunConfig(
            name=s.name, storage_path=str(experiment.parent), verbose=0, callbacks=[Report(), *callbacks],
            # a member's last epoch ends it: PBT would otherwise copy another member's last epoch into it
            stop=StopSignal(epochs if pbt_run else None),
            # PBT copies a member's checkpoint of its last result, which may be epochs behind its newest
            checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_KEEP if pbt_run else 1),
            failure_config=tune.FailureConfig(max_failures=s.max_retry),  # restarts resume
        ),
    )
    log.info(f"study {s.name!r}: {what}")
    tuner.fit()
    signum = stop.requested()
    if signum and pbt_run:
        log.info(f"{stop.WHY[signum]}: the members go on from their last checkpoints on the next run")
    elif signum:
        stopped = search_alg.end_stopped(stop.WHY[signum])
        log.info(f"{stop.WHY[signum]}: trials {stopped} ended; those cut short are queued again and resume from "
                 f"their last epoch")
    stop.check()
    return study


def _init(address: str | None) -> None:
    """Ray on this machine, or the cluster at ``address``; the trials' processes there get this driver's
    setting of ``RAY_CHDIR_TO_TRIAL_DIR`` (a node started by ``ray start`` knows nothing of it)."""
    if not ray.is_initialized():
        chdir = {"RAY_CHDIR_TO_TRIAL_DIR": os.environ["RAY_CHDIR_TO_TRIAL_DIR"]}
        # without --address a Ray of its own, even where `ray start` left one running: "local"
        ray.init(address=address or "local", include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": chdir}, **({} if address else {"num_cpus": max(1, os.cpu_count() or 1)}))
        stop.install()  # ray.init made SIGTERM exit at whatever line the driver is on

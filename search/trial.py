"""One trial's life, the same for the Optuna loop and the Ray trainable: ``run_trial`` trains it,
``finish`` ends it.

A trial trains in its own directory, ``<study dir>/trials/<number>/``: ``config.yaml`` (the resolved
trainer config), ``last.pt`` (the resume state with every RNG state, written atomically after each
epoch) and ``model.pt`` (the model without heads). A completed trial keeps ``config.yaml`` and
``model.pt`` (also uploaded as Optuna artifacts); a pruned or failed one keeps only ``config.yaml``
(and ``error.txt`` with the traceback). A trial interrupted (Ctrl-C) or killed keeps ``last.pt``: its
retry, a new trial with the same params, moves that file into its own directory and continues from
the last finished epoch, so its per-epoch history equals an unbroken run's.

Any error of the trial (a sampled config the model rejects, out of memory, a data error, divergence)
fails the trial with a one-line ``fail_reason``, never the worker. ``finish`` is the one place a trial
ends, for both backends: user attrs, ``fail_reason``, artifacts, checkpoints and Optuna's state.
"""

from __future__ import annotations

import contextlib
import errno
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
import yaml
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from search import compat, remote
from search.retry import requeue, retry_history
from search.metrics import METRICS, spike_rate
from search.progress import EpochProgress
from search.space import Space
from trainer import stop
from trainer.checkpoint import MODEL_FILE, STATE_FILE, UnreadableStateError, load_history
from trainer.config import ConfigError
from trainer.files import WriteError
from trainer.fit import EpochReport, fit

CONFIG_FILE = "config.yaml"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (*DISK_FULL, errno.EACCES, errno.EPERM, errno.EROFS)  # the folder's fault, never the config's


class TrialRecord:
    """What a trial keeps after each epoch; ``attrs`` become the trial's user attrs: ``config`` (the
    resolved trainer config), ``history``
    (per-epoch metrics), ``grad_stats`` (first and last epoch), ``grad_flow`` (|dL/dx| at each LIF input:
    ``layers``, per-epoch rows ``mean`` and ``var``, and the first epoch's ``split`` into the main loss's
    and the heads' part), ``firing_rates`` (last epoch),
    ``epochs_run``, and ``starts`` (the epoch each run of this trial started from: [0, 5] means it was
    resumed after epoch 5). Without ``per_epoch`` (a confirmation, scored once on the test split at the end)
    the values stay NaN until then."""

    def __init__(self, metrics: list[str], per_epoch: bool = True) -> None:
        self.metrics, self.per_epoch = metrics, per_epoch
        self.values = [math.nan] * len(metrics)
        self.history: list[dict[str, float]] = []
        self.grads: dict[str, dict] = {}
        self.flow: dict[str, object] = {}
        self.starts: list[int] = []
        self.attrs: dict[str, object] = {}

    def update(self, report: EpochReport) -> list[float]:
        train_time = sum(h["epoch_time"] for h in self.history) + report.metrics["epoch_time"]
        self.values = [METRICS[m].read(report, train_time) if self.per_epoch else math.nan for m in self.metrics]
        self.history.append({**report.metrics, "spike_rate": spike_rate(report)})
        self.grads.setdefault("first", report.grad_stats)
        self.grads["last"] = report.grad_stats
        if report.grad_flow:  # compact: one row of per-layer values per epoch
            self.flow.setdefault("layers", list(report.grad_flow))
            for stat in ("mean", "var"):
                self.flow.setdefault(stat, []).append([report.grad_flow.get(n, {}).get(stat, 0.0)
                                                       for n in self.flow["layers"]])
        if report.flow_split:
            self.flow["split"] = report.flow_split
        self.attrs.update(history=self.history, epochs_run=report.epoch + 1, starts=self.starts,
                          firing_rates=report.firing_rates, grad_stats=self.grads, grad_flow=self.flow)
        return self.values


@dataclass
class Outcome:
    state: TrialState  # COMPLETE, PRUNED or FAIL
    values: list[float]
    attrs: dict[str, object] = field(default_factory=dict)
    fail_reason: str | None = None
    requeue: bool = False  # interrupted: FAIL, keep last.pt and queue a copy that resumes from it
    stop: bool = False  # the worker cannot go on (its folder is full or read-only): it exits with ``fail_reason``


# Called after each epoch with the record so far, the epoch's report and whether that epoch was
# restored from an earlier attempt; the Optuna hook may raise optuna.TrialPruned.
Hook = Callable[[TrialRecord, EpochReport, bool], None]


def trial_dir(root: Path, number: int) -> Path:
    return root / "trials" / str(number)


def directories(root: Path, trial: FrozenTrial) -> tuple[Path, list[Path]]:
    """This trial's directory and those of its earlier attempts, newest first."""
    return trial_dir(root, trial.number), [trial_dir(root, n) for n in reversed(retry_history(trial))]


def _adopt(directory: Path, earlier: list[Path]) -> None:
    """Move the newest resume state of an earlier attempt here; drop their other checkpoints."""
    for old in earlier:
        state = old / STATE_FILE
        if state.exists() and not (directory / STATE_FILE).exists():
            state.replace(directory / STATE_FILE)
        (old / MODEL_FILE).unlink(missing_ok=True)


LINEAGE_FILE = "lineage.json"  # a PBT member's copies (search/pbt.py), saved with each Ray checkpoint


def drop_checkpoints(directory: Path) -> None:
    for name in (STATE_FILE, MODEL_FILE, LINEAGE_FILE):
        (directory / name).unlink(missing_ok=True)


def unwritable(err: OSError, directory: Path) -> bool:
    """A full disk anywhere, or a study folder that cannot be written (not, say, a data set that cannot be read)."""
    if err.errno in DISK_FULL or isinstance(err, WriteError):
        return True
    return err.errno in UNWRITABLE and bool(err.filename) and Path(err.filename).is_relative_to(directory.parent)


def cannot_write(err: OSError) -> str:
    """One line naming the file that could not be written, and why."""
    if isinstance(err, WriteError):  # its message names the file already
        text = err.strerror
    else:
        text = f"cannot write {err.filename or 'a file'}: {err.strerror or err}"
    return f"disk full: {text}" if err.errno in DISK_FULL else text


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def run_trial(space: Space, number: int, values: dict, directory: Path, earlier: list[Path], hook: Hook,
              progress: EpochProgress, starts: list[int] = (), keep_own: bool = False,
              fetch: Callable[[Path], None] | None = None) -> Outcome:
    """Train trial ``number`` of ``space`` with the sampled ``values`` in ``directory``, resuming from an
    earlier attempt's ``last.pt`` (``starts``: where earlier runs started), or from its own with
    ``keep_own`` (a Ray restore put it there), or from what ``fetch`` puts there when it is newer (the
    artifact store's copy, ``search/remote.py``); other files already there are from another study of
    the same name and are dropped. Only KeyboardInterrupt (and SystemExit) propagate; the
    checkpoint stays for the retry."""
    metrics = space.study.metrics
    record = TrialRecord(metrics, per_epoch=not space.on_test)
    record.starts.extend(starts)
    try:
        cfg = space.config(values)
    except ConfigError as err:
        return Outcome(TrialState.FAIL, record.values, fail_reason=str(err))
    record.attrs["config"] = cfg.to_dict()

    def on_epoch(report: EpochReport) -> None:
        record.update(report)
        progress.epoch(report)
        hook(record, report, False)

    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not keep_own:
            drop_checkpoints(directory)
        (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _adopt(directory, earlier)
        if fetch:
            fetch(directory)
        restored = [EpochReport(**r) for r in _readable_history(directory, progress)]
        record.starts.append(len(restored))
        for report in restored:
            record.update(report)
            hook(record, report, True)
        progress.start(number, cfg.optim.epochs, len(restored))
        result = fit(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": str(directory),
                                                                              "resume": True})}),
                     on_epoch, test=space.on_test)  # a search trial never reads the test split
        if space.on_test:
            record.values = [result.test[m] for m in metrics]
            record.attrs["test"] = result.test
    except optuna.TrialPruned:
        return Outcome(TrialState.PRUNED, record.values, record.attrs)
    except Exception as err:  # noqa: BLE001 - any error fails this trial, not the worker
        if stop.requested():  # a stop signal to the process group also ends the data loader's workers
            raise stop.Stopped(stop.requested()) from err
        if isinstance(err, OSError) and unwritable(err, directory):  # the copy runs once there is room
            return Outcome(TrialState.FAIL, record.values, record.attrs, f"{cannot_write(err)}; queued again",
                           requeue=True, stop=True)
        return _failed(record, directory, err)
    finally:
        progress.close()
    if any(math.isnan(v) for v in record.values):
        return Outcome(TrialState.FAIL, record.values, record.attrs, f"a metric is NaN: {record.values}")
    return Outcome(TrialState.COMPLETE, record.values, record.attrs)


def _readable_history(directory: Path, progress: EpochProgress) -> list[dict]:
    """The reports in ``last.pt``; one that cannot be read (truncated, garbage, or a pickle that is more
    than tensors and plain types) is set aside as ``last.pt.unreadable`` and the trial starts again from
    epoch 0 with its params, rather than failing for good."""
    try:
        return load_history(directory)
    except UnreadableStateError as err:
        (directory / STATE_FILE).replace(directory / f"{STATE_FILE}.unreadable")
        progress.warn(f"{err}; set aside as {STATE_FILE}.unreadable, starting again from epoch 0")
        return []


def _failed(record: TrialRecord, directory: Path, err: BaseException) -> Outcome:
    """A failed trial's outcome; the traceback goes to ``error.txt`` if the folder can still be written."""
    with contextlib.suppress(OSError):
        (directory / "error.txt").write_text(traceback.format_exc())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # after an out-of-memory error, leave the next trial the memory
    return Outcome(TrialState.FAIL, record.values, record.attrs, _one_line(err))


def keep_artifacts(store: compat.ArtifactStore, trial: optuna.Trial, directory: Path) -> None:
    """Register a completed trial's ``model.pt`` and ``config.yaml`` as Optuna artifacts (the dashboard
    lists them with ``--artifact-dir``; export copies the best model from there)."""
    for name in (MODEL_FILE, CONFIG_FILE):
        if (directory / name).exists():
            upload_artifact(artifact_store=store, file_path=str(directory / name), study_or_trial=trial)


def finish(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, directory: Path,
           artifacts: compat.ArtifactStore) -> FrozenTrial:
    """End ``trial`` (both backends call this, and nothing else ends a trial): record its user attrs and
    ``fail_reason``; keep a completed trial's model and config as artifacts and drop its resume state;
    drop a pruned or failed trial's checkpoints, except an interrupted one's ``last.pt``, from which the
    copy queued here resumes, and the copy of it uploaded to the artifact store; tell Optuna.

    A stop signal never cuts this short (``trainer.stop``). A folder that cannot be written is recorded as
    the user attr ``file_error`` (one line naming the path) and the trial still ends."""
    for key, value in outcome.attrs.items():
        trial.set_user_attr(key, value)
    if outcome.fail_reason:
        trial.set_user_attr("fail_reason", outcome.fail_reason)
    try:
        _keep_files(trial, outcome, directory, artifacts)
    except OSError as err:
        trial.set_user_attr("file_error", cannot_write(err))
    stop.point("finish")
    if outcome.state == TrialState.COMPLETE:
        return study.tell(trial, outcome.values)
    ended = study.tell(trial, state=outcome.state)
    if outcome.requeue:
        requeue(study, ended, max_retry=None)
    return ended


def _keep_files(trial: optuna.Trial, outcome: Outcome, directory: Path, artifacts: compat.ArtifactStore) -> None:
    """The files of ``finish``: a completed trial's artifacts kept, checkpoints that nothing resumes from dropped."""
    if not outcome.requeue:
        remote.drop(artifacts, trial.user_attrs)
    if outcome.state == TrialState.COMPLETE:
        keep_artifacts(artifacts, trial, directory)
        (directory / STATE_FILE).unlink(missing_ok=True)
        (directory / LINEAGE_FILE).unlink(missing_ok=True)
    elif not outcome.requeue:
        drop_checkpoints(directory)

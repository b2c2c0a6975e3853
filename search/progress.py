"""What a worker prints: a line per epoch of the running trial, and a line per finished trial.

On a terminal the epoch line is a tqdm bar (one row per worker); in logs, CI and Ray it is a plain
line per epoch, so a week-long trial is never silent.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from search.space import CONFIRM, CONTROL
from search.study import FINISHED, best_full, is_full, select
from trainer.fit import EpochReport


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class EpochProgress:
    """trial number, epoch e/E, val_acc, lambda, seconds per epoch and ETA of the running trial."""

    def __init__(self, tag: str = "", position: int = 0, out: TextIO | None = None) -> None:
        self.tag, self.position, self.out = tag, position, out
        self.bar: tqdm | None = None

    def _stream(self) -> TextIO:
        return self.out or sys.stdout

    def start(self, number: int, epochs: int, done: int) -> None:
        self.number, self.epochs, self.done, self.ran = number, epochs, done, 0
        self.started = time.perf_counter()
        if self._stream().isatty():
            self.bar = tqdm(total=epochs, initial=done, desc=f"{self.tag}trial {number}", unit="epoch",
                            position=self.position, leave=False, dynamic_ncols=True, mininterval=0)
        elif done:
            print(f"{self.tag}trial {number} resumes after epoch {done}/{epochs}", file=self._stream(), flush=True)

    def epoch(self, report: EpochReport) -> None:
        self.ran += 1
        m = report.metrics
        score = ("val_acc", m["val_acc"]) if "val_acc" in m else ("train_acc", m["train_acc"])  # no val: retraining
        if self.bar is not None:
            self.bar.set_postfix({score[0]: f"{score[1]:.3f}", "lam": f"{m['lambda']:.2f}"}, refresh=False)
            self.bar.update(1)
            return
        per_epoch = (time.perf_counter() - self.started) / self.ran
        left = self.epochs - report.epoch - 1
        print(f"{self.tag}trial {self.number} epoch {report.epoch + 1}/{self.epochs} {score[0]}={score[1]:.4f} "
              f"lambda={m['lambda']:.3f} {per_epoch:.1f} s/epoch ETA {_duration(per_epoch * left)}",
              file=self._stream(), flush=True)

    def warn(self, text: str) -> None:
        """A line the user must see, whatever the bar is doing."""
        line = f"{self.tag}warning: {text}"
        if self.bar is not None:
            self.bar.write(line, file=self._stream())
        else:
            print(line, file=self._stream(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


class TrialLine:
    """One line per finished trial: its arm, number, state, value, the best of each arm so far, params."""

    def __init__(self, tag: str = "", out: TextIO | None = None) -> None:
        self.tag, self.out = tag, out
        self.started = time.perf_counter()

    def __call__(self, arms: list[optuna.Study], study: optuna.Study, trial: FrozenTrial) -> None:
        """``trial`` of ``study`` ended; ``arms`` are the search's studies, heads first."""
        done = sum(len(a.get_trials(deepcopy=False, states=FINISHED)) for a in arms)
        value = trial.values if trial.values and len(trial.values) > 1 else trial.value
        line = (f"[{time.perf_counter() - self.started:6.0f}s] {self.tag}{arm_label(study)}trial {trial.number} "
                f"{trial.state.name.lower()}")
        if value is not None:
            line += f" value={_fmt(value)}"
        if trial.state == TrialState.PRUNED:
            line += f" after {trial.last_step} epochs"
        if trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
            line += f" ({trial.user_attrs['fail_reason']})"
        line += f" | {best_line(arms)}" if best_line(arms) else ""
        confirm = trial.user_attrs.get("confirm")  # a retraining of `snn-search confirm`: which config, which seed
        params = f"{confirm['label']}, seed {confirm['seed']}" if confirm else \
            ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        print(f"{line} | {done} finished | {params}", file=self.out or sys.stdout, flush=True)


def arm_label(study: optuna.Study) -> str:
    """What a trial number is prefixed with: "control " in the control arm, nothing in the search's own."""
    return "control " if study.study_name.endswith(CONTROL) else ""


def best_line(arms: list[optuna.Study]) -> str:
    """The best full-length trial of each arm so far: with heads, and without (the control arm)."""
    if arms[0].study_name.endswith(CONFIRM):  # retrainings of different configs: no best to speak of yet
        return ""
    if len(arms[0].directions) > 1:
        front = [t for t in arms[0].get_trials(deepcopy=False) if is_full(t)]
        return f"pareto front: {len(select(arms[0], pareto=True))} trials" if front else ""
    heads = best_full(arms[0])
    control = best_full(arms[1]) if len(arms) > 1 else None
    label = "best with heads" if len(arms) > 1 else "best"
    parts = [f"{label}={_fmt(heads.value)} (trial {heads.number})"] if heads else []
    if control:
        parts.append(f"without={_fmt(control.value)} (control trial {control.number})")
    return ", ".join(parts)

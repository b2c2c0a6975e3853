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

from search.budget import is_baseline
from search.study import FINISHED, baseline, select
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
        if self.bar is not None:
            self.bar.set_postfix(val_acc=f"{m['val_acc']:.3f}", lam=f"{m['lambda']:.2f}", refresh=False)
            self.bar.update(1)
            return
        per_epoch = (time.perf_counter() - self.started) / self.ran
        left = self.epochs - report.epoch - 1
        print(f"{self.tag}trial {self.number} epoch {report.epoch + 1}/{self.epochs} val_acc={m['val_acc']:.4f} "
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
    """One line per finished trial: number, state, value, best so far, params."""

    def __init__(self, tag: str = "", out: TextIO | None = None) -> None:
        self.tag, self.out = tag, out
        self.started = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        value = trial.values if trial.values and len(trial.values) > 1 else trial.value
        line = f"[{time.perf_counter() - self.started:6.0f}s] {self.tag}trial {trial.number} {trial.state.name.lower()}"
        if value is not None:
            line += f" value={_fmt(value)}"
        if trial.state == TrialState.PRUNED:
            line += f" after {trial.last_step} epochs"
        if trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
            line += f" ({trial.user_attrs['fail_reason']})"
        single = len(study.directions) == 1
        reference = baseline(study) if single else None
        if is_baseline(trial):
            line += " (baseline: the base config without heads)"
        elif reference is not None and trial.value is not None:
            line += f" ({trial.value - reference.value:+.4g} vs. baseline)"
        try:  # the trials export and report would pick: full-length, never the baseline
            chosen = select(study, pareto=not single)
            line += f" | best={_fmt(chosen[0].value)} (trial {chosen[0].number})" if single else \
                f" | pareto front: {len(chosen)} trials"
        except ValueError:  # no full-length trial yet
            pass
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        print(f"{line} | {done} finished | {params}", file=self.out or sys.stdout, flush=True)

"""The trainer as an Optuna objective: sample, train, report each epoch, record what happened."""

from __future__ import annotations

import math
import statistics
import time

import optuna

from search.space import Space, suggest
from trainer.config import ConfigError
from trainer.fit import DivergedError, EpochReport, fit


def metric(name: str, report: EpochReport, elapsed: float) -> float:
    """One study metric after an epoch; ``train_time`` is the seconds spent training so far."""
    if name == "spike_rate":
        rates = report.firing_rates.values()
        return statistics.mean(rates) if rates else 0.0
    if name == "train_time":
        return elapsed
    return report.metrics[name]


class TrialRecord:
    """What a trial keeps after each epoch, shared by the Optuna and Ray backends.

    ``attrs`` become the trial's user attrs: ``history`` (per-epoch metrics), ``grad_stats`` (first and
    last epoch), ``firing_rates`` (last epoch), ``epochs_run``.
    """

    def __init__(self, metrics: list[str]) -> None:
        self.metrics = metrics
        self.values = [math.nan] * len(metrics)
        self.history: list[dict[str, float]] = []
        self.grads: dict[str, dict] = {}
        self.attrs: dict[str, object] = {}
        self.started = time.perf_counter()

    def update(self, report: EpochReport) -> list[float]:
        elapsed = time.perf_counter() - self.started
        self.values = [metric(m, report, elapsed) for m in self.metrics]
        self.history.append({**report.metrics, "spike_rate": metric("spike_rate", report, elapsed)})
        self.grads.setdefault("first", report.grad_stats)
        self.grads["last"] = report.grad_stats
        self.attrs = {"history": self.history, "epochs_run": report.epoch + 1,
                      "firing_rates": report.firing_rates, "grad_stats": self.grads}
        return self.values


class Objective:
    """Calls ``fit`` on base config + sampled values; prunes on the first metric (single objective).

    User attrs per trial: ``config`` (resolved trainer config), ``history`` (per-epoch metrics),
    ``grad_stats`` (first and last epoch), ``firing_rates`` (last epoch), ``epochs_run``, and
    ``fail_reason`` when the loss diverged or the sampled config was invalid.
    """

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        study = self.space.study
        nan = [math.nan] * len(study.metrics)
        try:
            cfg = self.space.config(suggest(trial, self.space.params))
        except ConfigError as err:
            trial.set_user_attr("fail_reason", str(err))
            return nan if len(nan) > 1 else nan[0]
        trial.set_user_attr("config", cfg.to_dict())
        record = TrialRecord(study.metrics)

        def on_epoch(report: EpochReport) -> None:
            values = record.update(report)
            for key, value in record.attrs.items():
                trial.set_user_attr(key, value)
            if len(study.metrics) == 1:
                trial.report(values[0], report.epoch + 1)  # step = epochs trained
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after {report.epoch + 1} epochs")

        try:
            result = fit(cfg, on_epoch)
        except DivergedError as err:
            trial.set_user_attr("fail_reason", str(err))
            return nan if len(nan) > 1 else nan[0]
        trial.set_user_attr("test", result.test)
        return record.values if len(record.values) > 1 else record.values[0]

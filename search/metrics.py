"""Study metrics by name (``study.metric``): what each reads off an epoch, and its default direction.

    energy      µJ per validation sample from synaptic operations (``trainer/energy.py``)
    sops        synaptic operations per validation sample
    spike_rate  mean firing rate over the LIF layers
    train_time  seconds spent training so far
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from trainer.fit import EpochReport
from trainer.registry import Registry


@dataclass(frozen=True)
class Metric:
    direction: str  # "maximize" or "minimize": the default of study.direction
    read: Callable[[EpochReport, float], float]  # (the epoch's report, seconds trained so far) -> value


def _reported(name: str) -> Callable[[EpochReport, float], float]:
    return lambda report, train_time: report.metrics[name]


def spike_rate(report: EpochReport, train_time: float = 0.0) -> float:
    rates = report.firing_rates.values()
    return statistics.mean(rates) if rates else 0.0


METRICS: Registry[Metric] = Registry("metric")
METRICS.register("val_acc")(Metric("maximize", _reported("val_acc")))
METRICS.register("val_loss")(Metric("minimize", _reported("val_loss")))
METRICS.register("energy")(Metric("minimize", _reported("energy")))
METRICS.register("sops")(Metric("minimize", _reported("sops")))
METRICS.register("spike_rate")(Metric("minimize", spike_rate))
METRICS.register("train_time")(Metric("minimize", lambda report, train_time: train_time))

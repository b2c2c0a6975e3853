"""Pruners by name (``study.pruner``): one registry whose entries build both Optuna's pruner and Ray
Tune's scheduler, so the two backends stop the same trials by the same rule.

Steps are epochs trained (Tune's ``training_iteration``) and no rule stops a trial before
``min_epochs`` of them. Optuna's pruners and Tune's ASHA and median rule take that as a grace period
or minimum resource; Tune's HyperBand has no such parameter, so ``hyperband`` on Ray lets every trial
continue until ``min_epochs`` and only then hands its results to HyperBand (whose smallest bracket
would otherwise cut at epoch 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from trainer.registry import Registry


@dataclass(frozen=True)
class Pruner:
    optuna: Callable[[int, int], optuna.pruners.BasePruner]  # (min_epochs, epochs) -> Optuna pruner
    tune: Callable[[int, int], Any]  # (min_epochs, epochs) -> Tune scheduler (Ray is imported only here)


def _hyperband_tune(first: int, epochs: int) -> Any:
    from ray.tune.schedulers import HyperBandScheduler, TrialScheduler

    class HyperBand(HyperBandScheduler):
        """HyperBand that decides nothing before ``first`` epochs."""

        TIME_ATTR = "training_iteration"

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get(self.TIME_ATTR, 0) < first:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return HyperBand(time_attr=HyperBand.TIME_ATTR, max_t=epochs)


def _asha_tune(first: int, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=first, reduction_factor=3)


def _median_tune(first: int, epochs: int) -> Any:
    from ray.tune.schedulers import MedianStoppingRule

    return MedianStoppingRule("training_iteration", grace_period=first, min_samples_required=3)


def _fifo_tune(first: int, epochs: int) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


PRUNERS: Registry[Pruner] = Registry("pruner")
PRUNERS.register("median")(Pruner(
    lambda first, epochs: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=first), _median_tune))
PRUNERS.register("hyperband")(Pruner(lambda first, epochs: optuna.pruners.HyperbandPruner(
    min_resource=first, max_resource=epochs, reduction_factor=3), _hyperband_tune))
PRUNERS.register("successive_halving")(Pruner(lambda first, epochs: optuna.pruners.SuccessiveHalvingPruner(
    min_resource=first, reduction_factor=3), _asha_tune))
PRUNERS.register("none")(Pruner(lambda first, epochs: optuna.pruners.NopPruner(), _fifo_tune))


def _args(space: Any) -> tuple[int, int]:
    return space.min_epochs(), space.config({}).optim.epochs


def make_pruner(space: Any) -> optuna.pruners.BasePruner:
    """Optuna's pruner for ``space`` (a ``search.space.Space``)."""
    return PRUNERS[space.study.pruner].optuna(*_args(space))


def make_scheduler(space: Any) -> Any:
    """Tune's scheduler for ``space``."""
    return PRUNERS[space.study.pruner].tune(*_args(space))

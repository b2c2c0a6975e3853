"""Samplers by name (``study.sampler``): a name -> factory registry (pruners: ``search/pruners.py``).

Each worker passes its own seed (``worker_seed``), so workers on one study never draw the same
start-up trials. TPE runs with ``constant_liar``: while other trials run, it treats them as bad
results at their params and samples elsewhere (with one worker nothing runs meanwhile, so nothing
changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import optuna
from optuna.samplers import BaseSampler, GridSampler

from trainer.registry import Registry
from trainer.seeds import derive


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the space: a quarter of the budget, 3 to Optuna's default 10."""
    return min(10, max(3, n_trials // 4))


def population(n_trials: int) -> int:
    """NSGA-II's generation size: a third of the budget (three generations), 4 to Optuna's default 50.
    A population of 50 in a 10-trial study would never leave the random first generation."""
    return min(50, max(4, n_trials // 3))


def worker_seed(seed: int | None, worker: int) -> int | None:
    """Worker ``worker``'s sampler seed: an independent stream derived from ``study.seed``."""
    return None if seed is None else derive(seed, worker)


class Grid(GridSampler):
    """GridSampler that leaves stopping to the ask loop (which checks ``is_exhausted`` before each ask):
    Optuna's calls ``study.stop()``, which raises outside ``study.optimize``."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        pass


class Gridded(Protocol):
    """A parameter that lists its grid points (each parameter of ``search.space`` does)."""

    def grid(self) -> dict[str, list[Any]]: ...


def grid(params: Iterable[Gridded]) -> dict[str, list[Any]]:
    """GridSampler's search space: every parameter's grid points, by Optuna parameter name."""
    return {name: points for p in params for name, points in p.grid().items()}


# (space, seed) -> sampler, where space is a search.space.Space (which imports this module).
SAMPLERS: Registry[Callable[[Any, int | None], BaseSampler]] = Registry("sampler")
# Optuna's 10 random start-up trials would leave a 12-trial study 2 model-guided ones.
SAMPLERS.register("tpe")(lambda space, seed: optuna.samplers.TPESampler(
    seed=seed, n_startup_trials=startup_trials(space.study.n_trials), constant_liar=True))
SAMPLERS.register("gp")(lambda space, seed: optuna.samplers.GPSampler(seed=seed))
SAMPLERS.register("cmaes")(lambda space, seed: optuna.samplers.CmaEsSampler(seed=seed))
SAMPLERS.register("random")(lambda space, seed: optuna.samplers.RandomSampler(seed=seed))
SAMPLERS.register("nsga2")(lambda space, seed: optuna.samplers.NSGAIISampler(
    seed=seed, population_size=population(space.study.n_trials)))
SAMPLERS.register("grid")(lambda space, seed: Grid(grid(space.params), seed=seed))


def make_sampler(space: Any, worker: int = 0) -> BaseSampler:
    return SAMPLERS[space.study.sampler](space, worker_seed(space.study.seed, worker))

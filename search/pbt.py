"""Population-based training (``study.scheduler: pbt``, on Ray): the lambda schedule found while training.

``study.population`` members train at once, each an Optuna trial of the study. Every
``study.perturbation_interval`` epochs Ray Tune's ``PopulationBasedTraining`` has the worst quarter copy
the best quarter's last checkpoint (weights, optimizer, epoch) and perturb the searched values (x0.8 or
x1.2, or drawn again), so the lambda each member trains under is itself a schedule, found while
training (Jaderberg et al. 2017). Export writes the best member's as ``lambda.schedule: table``.

Only values that can change mid-training are searched (``MUTABLE``): heads, timesteps or the
architecture would change the network a copied checkpoint belongs to. Tune refuses a search algorithm
with PBT, so the study's Optuna sampler draws the first population, which Tune's default generator runs
as ``points_to_evaluate``.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search import compat
from search.space import Categorical, Float, Int, Param, Space, SpaceError, suggest
from search.trial import LINEAGE_FILE, trial_dir
from trainer.files import atomic_write
from trainer.logs import logger
from trainer.seeds import derive

log = logger(__name__)
POPULATION_STREAM = 1 << 20  # the seed stream of a population's decisions (the workers' are 0, 1, 2, ...)
MUTABLE = ("lambda.start", "optim.lr", "optim.weight_decay", "optim.momentum")


def check(space: Space) -> None:
    """Refuse a PBT space that searches what cannot change mid-training, in one line naming the keys."""
    kind = space.study.scheduler
    if kind is None:
        return
    kinds = Float | Int if kind == "pb2" else Float | Int | Categorical  # PB2 models numbers in ranges
    fixed = [p.key for p in space.params if p.key not in MUTABLE or p.when or not isinstance(p, kinds)]
    if fixed:
        raise SpaceError(f"{space.path}: 'space': study.scheduler {kind} changes values mid-training, and "
                         f"{', '.join(fixed)} would change the network or cannot be perturbed (allowed: "
                         f"{', '.join(MUTABLE)}, {'float or int' if kind == 'pb2' else 'any type'}, without "
                         f"'when'; search the others without a scheduler)")


class Resample:
    """A numeric parameter drawn again (PBT's resampling; a class, so Tune can pickle it), from a generator
    of its own seeded from ``study.seed``: two runs with one seed draw the same values."""

    def __init__(self, low: float, high: float, log: bool, integer: bool, seed: int | None = None) -> None:
        self.low, self.high, self.log, self.integer = low, high, log, integer
        self.draw = random.Random(seed)

    def __call__(self) -> float | int:
        if self.log:
            value = math.exp(self.draw.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = self.draw.uniform(self.low, self.high)
        return round(value) if self.integer else value


def mutations(params: list[Param], seed: int | None = None) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: choices shift to a neighbour, numbers are scaled or drawn again."""
    return {"values": {p.key: list(p.choices) if isinstance(p, Categorical) else
                       Resample(p.low, p.high, p.log, isinstance(p, Int), None if seed is None else derive(seed, i))
                       for i, p in enumerate(params)}}


class Clip:
    """PBT's ``custom_explore_fn``: a perturbed number back into its range and onto its step (x1.2 of a
    lambda of 0.9 would be 1.08)."""

    def __init__(self, params: list[Param]) -> None:
        self.params = [p for p in params if isinstance(p, Float | Int)]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        values = config["values"]
        for p in self.params:
            value = min(max(values[p.key], p.low), p.high)
            if p.step:
                value = p.low + round((value - p.low) / p.step) * p.step
            values[p.key] = round(value) if isinstance(p, Int) else value
        return config


def scheduler(space: Space) -> Any:
    """Synchronous PBT (or PB2): at each perturbation the members wait for each other, so which member
    copies which does not depend on who reported first. Ray Tune's PBT decides from Python's global
    ``random`` (which member to copy, perturb or draw again, by which factor), so with ``study.seed`` that
    generator is seeded here, in the driver, and the resampled values come from seeded generators of their
    own: two runs with one seed perturb alike, given the same results."""
    seed = space.study.seed
    if seed is not None:
        random.seed(derive(seed, POPULATION_STREAM))
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    def synchronous(base: type) -> type:
        class Synchronous(base):
            """``base`` whose members are never stopped for having copied another: a member that reported
            while the last one was on its way copies while Tune still saves it, and Tune then keeps a STOP
            for it (``compat.forget_stale_stop``); without this the copy ends one epoch later."""

            def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
                decision = super().on_trial_result(tune_controller, trial, result)
                for member in tune_controller.get_trials():
                    compat.forget_stale_stop(tune_controller, member)
                return decision

            def choose_trial_to_run(self, tune_controller: Any) -> Any:
                """Also a paused member when none runs: it waits for a perturbation that no member can
                bring any more. A resumed population's members start at different epochs, and one that
                ends (its last epoch) before the scheduler saw it reach the sync point leaves the others
                paused for ever (seen in the population test's resumed run)."""
                chosen = super().choose_trial_to_run(tune_controller)
                trials = tune_controller.get_trials()
                if chosen is None and not any(t.status == "RUNNING" for t in trials):
                    chosen = next((t for t in trials if t.status in ("PAUSED", "PENDING")), None)
                return chosen

        return Synchronous

    if space.study.scheduler == "pb2":  # PBT whose new values come from a Gaussian-process bandit
        return synchronous(PB2)(time_attr="epochs_run", perturbation_interval=space.study.perturbation_interval,
                                hyperparam_bounds={"values": {p.key: [p.low, p.high] for p in space.params}},
                                custom_explore_fn=Clip(space.params), quantile_fraction=0.25, synch=True)
    # epochs, not Tune's count of results: a member a new driver resumes after epoch 3 is at epoch 3
    return synchronous(PopulationBasedTraining)(
        time_attr="epochs_run", perturbation_interval=space.study.perturbation_interval,
        hyperparam_mutations=mutations(space.params, seed), custom_explore_fn=Clip(space.params), quantile_fraction=0.25,
        resample_probability=0.25, synch=True)


def draw(study: optuna.Study, space: Space, size: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
    """The first population: ``size`` trials asked of the study (its sampler, the worker's seed stream)."""
    members = []
    for _ in range(size):
        with warnings.catch_warnings():  # Tune, not heartbeats, tracks whether Ray trials are alive
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial.set_user_attr("backend", "ray")
        members.append((trial, suggest(trial, space.params)))
    return members


def tune_config(number: int, values: dict[str, Any], root: Path, resume: bool = False) -> dict[str, Any]:
    """A member's Tune config: its Optuna trial, values and folder; ``resume``: go on from its last.pt."""
    return {"trial": number, "values": values, "directory": str(trial_dir(root, number).resolve()), "earlier": [],
            "resume": resume, "cwd": os.getcwd()}


def survivors(study: optuna.Study, root: Path) -> list[dict[str, Any]]:
    """The members a dead driver left RUNNING, to go on from their last.pt with the values they last had
    (their params, or those of their last copy)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        copies = Member.restored(trial_dir(root, t.number), trial_dir(root, t.number), t.number, 0, {}).copies
        out.append(tune_config(t.number, copies[-1]["values"] if copies else t.params, root, resume=True))
    return out


@dataclass
class Member:
    """A member's copies, each ``{trial, epoch, donor, values}``: member ``trial`` copied ``donor`` after
    ``epoch`` epochs and went on with ``values``. Saved beside its last.pt after every epoch
    (``lineage.json``), so they travel with its Tune checkpoints."""

    trial: int
    lineage: list[dict[str, Any]] = field(default_factory=list)  # the copies that made its weights, oldest first
    copies: list[dict[str, Any]] = field(default_factory=list)  # every copy it made, replaced weights' too

    @classmethod
    def restored(cls, saved: Path, own: Path, trial: int, epochs: int, values: dict[str, Any]) -> Member:
        """Member ``trial`` (its folder ``own``) as it (re)starts from the checkpoint ``saved``: its own (a
        restart), or another member's, which PBT copied after ``epochs`` epochs and perturbed to
        ``values``: then that member's lineage, which made the epochs inherited, comes first."""
        state, mine = _read(saved / LINEAGE_FILE), _read(own / LINEAGE_FILE)
        made = mine["copies"] if mine and mine["trial"] == trial else []
        if state is None or state["trial"] == trial:
            return cls(trial, state["lineage"] if state else [], made)
        copy = {"trial": trial, "epoch": epochs, "donor": state["trial"], "values": values}
        log.info(f"trial {trial} copies trial {copy['donor']} after epoch {epochs} and goes on with {values}")
        return cls(trial, [*state["lineage"], copy], [*made, copy])

    def attrs(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """Its user attrs: the copies, and the lambda it trained under at every epoch (donors' included)."""
        return {"lineage": self.lineage, "copies": self.copies, "lambda_trajectory": [h["lambda"] for h in history]}

    def save(self, directory: Path) -> None:
        atomic_write(directory / LINEAGE_FILE, json.dumps(asdict(self)).encode())


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None

"""Studies: created once (or loaded), and the queries that ``export``, ``report`` and the backends share."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import compat
from search.space import CONTROL, Space
from search.storage import artifact_location, open_storage
from trainer.config import Config, build, set_dotted
from trainer.errors import UserError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
IDENTITY_SCHEMA = 1  # the form of a stored identity: another form is another study, said in one line


# Where and how a config runs, not what it is: workers on other devices or machines share a study.
PLACE_KEYS = ("base.run.device", "base.run.out_dir", "base.run.resume", "base.data.root", "base.data.download",
              "base.data.num_workers", "base.provenance")


class StudyMismatchError(UserError):
    """The stored study searches another setup (base config, parameters, metrics) than this run."""


def _flat(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: data}


def identity(space: Space) -> dict[str, Any]:
    """What a study searches, as dotted keys: the resolved base config (less where it runs), each
    parameter of the space, the metrics and their directions. A different identity is a different study."""
    doc = {k: v for k, v in _flat(space.config({}).to_dict(), "base").items() if not k.startswith(PLACE_KEYS)}
    for p in space.params:
        doc |= _flat(p.identity(), f"space.{p.key}")
    doc |= {"study.metric": space.study.metrics, "study.direction": space.study.directions, "schema": IDENTITY_SCHEMA}
    return json.loads(json.dumps(doc))  # as the storage gives it back


def _check_identity(space: Space, stored: dict[str, Any], mine: dict[str, Any]) -> None:
    """Raise unless ``stored`` and ``mine`` agree; a config key added since the study was created (such as
    ``lambda.table``) stands at its default in the stored identity, so an upgrade keeps every study."""
    defaults = {k: v for k, v in _flat(Config().to_dict(), "base").items()
                if k not in stored and not k.startswith(PLACE_KEYS)}
    stored = stored | json.loads(json.dumps(defaults))
    for key in sorted(stored.keys() | mine.keys()):
        if stored.get(key) != mine.get(key):
            keep = (f", or --set {key.removeprefix('base.')}={json.dumps(stored[key])} to go on with it"
                    if key.startswith("base.") and key in stored else "")
            raise StudyMismatchError(
                f"{space.path}: study {space.study.name!r} was created with {key}={stored.get(key, 'unset')!r}, this "
                f"run has {mine.get(key, 'unset')!r}: a different setup is a different study (--study-name NAME, "
                f"or another study.name{keep})")


def create_study(space: Space, storage: optuna.storages.BaseStorage, root: Path) -> optuna.Study:
    """Create the study once (or load it), recording what export and report need to know about it:
    among others where its artifacts live (``study.artifacts``, else ``<root>/artifacts``).

    Each backend then sets the study's sampler (with its worker's seed) and pruner.
    """
    study = optuna.create_study(study_name=space.study.name, storage=storage, directions=space.study.directions,
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != space.study.directions:
        raise StudyMismatchError(f"{space.path}: 'study.direction': the stored study {space.study.name!r} has "
                                 f"{[d.name.lower() for d in study.directions]}")
    attrs, mine = study.user_attrs, identity(space)  # user_attrs reads the storage on each access
    stored = attrs.get("identity")
    if stored is None:  # the first creation
        study.set_user_attr("identity", mine)
    elif stored.get("schema") != IDENTITY_SCHEMA:
        raise StudyMismatchError(f"{space.path}: study {space.study.name!r} was created by an earlier version of "
                                 f"this project (identity schema {stored.get('schema', 0)}, this one writes "
                                 f"{IDENTITY_SCHEMA}): run the space as a new study (--study-name NAME)")
    else:
        _check_identity(space, stored, mine)
    if attrs.get("space_file") is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(space.study.metrics)  # optuna-dashboard shows these names
        study.set_user_attr("metrics", space.study.metrics)
        study.set_user_attr("final", space.final)
        study.set_user_attr("artifacts", artifact_location(space.study.artifacts, root))
        study.set_user_attr("space_file", str(space.path))
        if space.recipe is not None:
            study.set_user_attr("recipe_file", space.recipe[0])
            study.set_user_attr("recipe", space.recipe[1])
    return study


def base_config(study: optuna.Study) -> Config:
    """The study's base trainer config, from its identity (where it ran at its defaults: ``PLACE_KEYS``)."""
    data: dict[str, Any] = {}
    for key, value in study.user_attrs["identity"].items():
        if key.startswith("base."):
            set_dotted(data, key.removeprefix("base."), value)
    return build(data, f"study {study.study_name}: base")


def load_study(study_name: str, storage_url: str) -> optuna.Study:
    """An existing study; ValueError (one line) if the database or the study is missing."""
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).exists():
        raise UserError(f"storage {storage_url}: no such database file")
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except KeyError:
        raise UserError(f"storage {storage_url}: no study named {study_name!r}") from None


def companion(study: optuna.Study, suffix: str = CONTROL) -> optuna.Study | None:
    """The study's companion in the same storage (its control arm, ``<name>.control``), if there is one."""
    try:
        return optuna.load_study(study_name=study.study_name + suffix, storage=compat.storage(study))
    except KeyError:
        return None


def best_full(study: optuna.Study | None) -> FrozenTrial | None:
    """The best trial that completed all its epochs, if the study (one objective) has one."""
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)] if study is not None else []
    if not full or len(study.directions) > 1:
        return None
    return select(study)[0]


def trial_config(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's trainer config as it trained; a PBT member's lambda as the schedule it realised, epoch by
    epoch (``lambda.schedule: table``), since its config holds only its last value."""
    config = dict(trial.user_attrs["config"])
    if "lambda_trajectory" in trial.user_attrs:
        config["lambda"] = {**config["lambda"], "schedule": "table", "fraction": 1.0,
                            "table": trial.user_attrs["lambda_trajectory"]}
    return config


def is_full(trial: FrozenTrial) -> bool:
    """A trial that completed all its configured epochs (not pruned, not stopped by a scheduler)."""
    config = trial.user_attrs.get("config")
    return (
        trial.state == TrialState.COMPLETE
        and config is not None
        and trial.user_attrs.get("epochs_run") == config["optim"]["epochs"]
        and not trial.user_attrs.get("truncated", False)
    )


def dominates(a: FrozenTrial, b: FrozenTrial, directions: list) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def select(study: optuna.Study, top_k: int = 1, pareto: bool = False) -> list[FrozenTrial]:
    """Full trials, best first: top-k for one objective, the Pareto front for several."""
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
    if not full:
        raise UserError(f"study {study.study_name!r} has no trial that completed all its epochs")
    if len(study.directions) > 1 or pareto:
        if len(study.directions) == 1:
            raise UserError("--pareto needs a multi-objective study")
        front = [t for t in full if not any(dominates(o, t, study.directions) for o in full)]
        return sorted(front, key=lambda t: t.number)
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return sorted(full, key=lambda t: -sign * t.value)[:top_k]

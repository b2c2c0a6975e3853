"""Search-space files: schema, validation and Optuna suggestions.

A space file has four sections (see docs/how-to/write-a-space.md):

    study:  name, metric(s), direction(s), sampler, pruner, min_epochs, n_trials, timeout, seed, storage,
            heartbeat, max_retry, artifacts, checkpoint_every, control, recipe, population, perturbation_interval
    base:   a full trainer config (same format as ``python -m trainer --config``)
    final:  dotted overrides applied when the best config is retrained at full length (``optim.epochs``:
            the base's own unless given; ``--base FILE`` swaps in a trainer config as the base)
    space:  parameters keyed by dotted config path, e.g. ``lambda.start: {type: float, low: 0.1, high: 1}``

Parameter types: ``float``/``int`` (inclusive ``low``/``high``, optional ``log`` or ``step``),
``categorical`` (``choices``) and ``subset`` (any subset of ``choices``, one yes/no parameter each;
used for head positions). ``when: {other.key: [values]}`` makes a parameter conditional on an earlier one.

The sections are pydantic models (``SpaceFile``; parameters are a union on ``type``), as the trainer config
is. Each parameter kind owns its Optuna distributions, its suggestion, its grid points and the values worth
checking against the base. Every problem is a ``SpaceError`` whose one-line message names the file, the
dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from search.metrics import METRICS
from search.pruners import PRUNERS
from search.samplers import SAMPLERS, grid
from trainer.config import Config, ConfigError, build, parse_override, read_yaml, set_dotted, with_values
from trainer.probe import check
from trainer.errors import UserError, quote
from trainer.registry import Registry

MAX_GRID = 10**6  # grid points of one parameter: more would not run, and would fill memory at load
HEAD_KEYS = ("heads.", "lambda.")  # what the control arm does not search: it trains without heads
CONTROL = ".control"  # the control arm's study: the search's name and this
CONFIRM = ".confirm"  # the study of `snn-search confirm`'s retrainings


class SpaceError(UserError):
    """A bad space file; the message is one line."""


def _bad(message: str, at: str = "") -> PydanticCustomError:
    """A validation error in this module's words; ``at`` extends the key it is reported at (for the checks
    of a whole mapping, which are about one of its keys)."""
    return PydanticCustomError("space", "{message}", {"message": message, "at": at})


def _one_line(err: ValidationError, path: Path) -> str:
    """The first problem of ``err`` as ``FILE: 'dotted.key': message`` (pydantic's own text is many lines)."""
    first = err.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    if loc[:1] == ["space"] and len(loc) > 2:
        del loc[2]  # the tag of the parameter union (its type), not a key of the file
    at = (first.get("ctx") or {}).get("at")
    key = ".".join([*loc, at] if at else loc)
    if first["type"] == "space":
        return f"{path}: '{key}': {first['msg']}"
    return f"{path}: '{key}': {first['msg']} (got {quote(first.get('input'))})"


def _err(path: Path, key: str, message: str) -> SpaceError:
    return SpaceError(f"{path}: '{key}': {message}")


def _check(ok: Callable[[Any], bool], wants: str) -> PlainValidator:
    """A field kept as written when ``ok(value)``, else an error saying what it ``wants``."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise _bad(f"{wants} (got {quote(value)})")
        return value

    return PlainValidator(check)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A number Optuna can take as a float: not a bool, ``.inf`` or ``.nan``, nor an int past float range."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _one_of(names: Registry) -> PlainValidator:
    """A name of a registry (``SAMPLERS``, ``PRUNERS``), with the registry's own message."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in names:
            raise _bad(names.unknown(value))
        return value

    return PlainValidator(check)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.replace("-", "_").isidentifier():
        raise _bad("required: letters, digits, '_' or '-'")
    return value


def _metrics(value: Any) -> list[str]:
    metrics = _as_list(value)
    for m in metrics:
        if not isinstance(m, str) or m not in METRICS:
            raise _bad(METRICS.unknown(m))
    return metrics


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if not _finite(value) or value <= 0:
        raise _bad(f"must be seconds > 0 or null (got {quote(value)})")
    return float(value)


def _mapping(wants: str) -> PlainValidator:
    """A section that may be left empty (``null``)."""

    def check(value: Any) -> dict[str, Any]:
        if value is not None and not isinstance(value, dict):
            raise _bad(f"{wants} (got {quote(value)})")
        return value or {}

    return PlainValidator(check)


def _when(value: Any) -> dict[str, list[Any]]:
    """``{other.key: values}``, a single value standing for a list of one."""
    if value is not None and not isinstance(value, dict):
        raise _bad(f"must map earlier parameters to their values (got {quote(value)})")
    return {other: _as_list(values) for other, values in (value or {}).items()}


def _count(low: int, null: bool = False) -> PlainValidator:
    return _check(lambda v: (null and v is None) or (_integer(v) and v >= low),
                  f"must be an integer >= {low}")


def _choice_list(value: Any) -> bool:
    """Non-empty, and no ``.inf`` or ``.nan`` (Optuna finds a choice by equality, and nan equals nothing)."""
    return isinstance(value, list) and bool(value) and all(
        not isinstance(c, float) or math.isfinite(c) for c in value)


_Bool = Annotated[bool, _check(lambda v: isinstance(v, bool), "must be true or false")]
_Number = Annotated[float | None, _check(lambda v: v is None or _finite(v), "must be a finite number")]
_NumberStep = Annotated[float | None, _check(lambda v: v is None or (_finite(v) and v > 0),
                                             "must be a finite number > 0")]
_Integer = Annotated[int | None, _check(lambda v: v is None or _integer(v), "must be an integer")]
_IntegerStep = Annotated[int | None, _count(1, null=True)]
_Seed = Annotated[int | None, _check(lambda v: v is None or _integer(v), "must be an integer or null")]
_Text = Annotated[str | None, _check(lambda v: v is None or isinstance(v, str), "must be a string or null")]
_ChoiceList = Annotated[list[Any], _check(_choice_list, "must be a non-empty list without .inf or .nan")]


class _Model(BaseModel):
    """A mapping of the space file; its first unknown key fails, listing the allowed ones."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.alias or name for name, f in cls.model_fields.items() if not f.exclude]

    @classmethod
    def _unknown(cls) -> str:
        return f"unknown key (allowed: {', '.join(cls._keys())})"

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        for key in data if isinstance(data, dict) else ():
            if key not in cls._keys():
                raise _bad(cls._unknown(), at=str(key))
        return data


class Study(_Model):
    """The ``study:`` section: what is optimized, how trials are sampled and pruned, and the budget."""

    name: Annotated[str, PlainValidator(_name)] = Field("", validate_default=True,
        description="letters, digits, _ or -")
    metrics: Annotated[list[str], PlainValidator(_metrics)] = Field(["val_acc"], alias="metric",
        description="METRICS")
    directions: list[str] = Field(None, alias="direction", validate_default=True,
        description="default: the metrics' own")
    sampler: Annotated[str, _one_of(SAMPLERS)] = Field("tpe", description="search/samplers.py")
    pruner: Annotated[str, _one_of(PRUNERS)] = Field("hyperband", description="search/pruners.py")
    min_epochs: Annotated[int | None, _count(1, null=True)] = Field(None,
        description="before pruning; null: Space.min_epochs")
    n_trials: Annotated[int, _count(1)] = Field(20, description="the budget (--n-trials overrides it)")
    timeout: Annotated[float | None, PlainValidator(_seconds)] = Field(None,
        description="seconds; null: no limit")
    seed: _Seed = Field(0, description="of the samplers; null: a fresh one each run")
    storage: _Text = Field(None,
        description="an Optuna storage URL; null: a SQLite file named after the study")
    heartbeat: Annotated[int, _count(1)] = Field(10,
        description="seconds between RUNNING-trial heartbeats (storage.timeouts)")
    max_retry: Annotated[int, _count(0)] = Field(2,
        description="times a trial whose worker died is queued again")
    artifacts: _Text = Field(None,
        description="folder of the artifact store, or s3://bucket, gs://bucket; null: <study dir>/artifacts")
    checkpoint_every: Annotated[int, _count(0)] = Field(0,
        description="epochs between uploads of last.pt to the artifacts; 0: never")
    control: Annotated[int | bool | None, _check(lambda v: v is None or v is False or (_integer(v) and v >= 0),
                                                 "must be an integer >= 0, false or null")] = Field(
        None, description="trials of the control arm, a companion study <name>.control that tunes the other "
                          "parameters with heads off; null: n_trials; false: one run of the base without heads; "
                          "0: no control arm")
    recipe: _Text = Field(None,
        description="a trainer config that `snn-search confirm` retrains as published (relative to this "
                    "file)")
    scheduler: Literal["pbt", "pb2"] | None = Field(
        None, description="train the trials as one population on Ray (search/pbt.py): pbt, Ray Tune's "
                          "population-based training; pb2, the same with new values from a Gaussian-process "
                          "bandit; null: each trial on its own")
    population: Annotated[int, _count(2)] = Field(4,
        description="scheduler pbt, pb2: members trained at once (the study's trials)")
    perturbation_interval: Annotated[int, _count(1)] = Field(2,
        description="scheduler pbt, pb2: epochs between copies")

    @model_validator(mode="before")
    @classmethod
    def _population(cls, data: Any) -> Any:
        """A population's scheduler stops no member, so the pruner is none; its first members are drawn at
        random unless the file says otherwise."""
        if isinstance(data, dict) and data.get("scheduler") is not None:
            data.setdefault("sampler", "random")
            if data.setdefault("pruner", "none") != "none":
                raise _bad("population-based training stops no member (allowed with scheduler pbt or pb2: none)",
                           at="pruner")
        return data

    @field_validator("directions", mode="plain")
    @classmethod
    def _directions(cls, value: Any, info: ValidationInfo) -> list[str]:
        metrics = info.data.get("metrics")
        if metrics is None:  # a bad metric, reported on its own
            return []
        if value is None:
            return [METRICS[m].direction for m in metrics]
        directions = _as_list(value)
        if len(directions) != len(metrics) or any(d not in ("maximize", "minimize") for d in directions):
            raise _bad(f"need one of maximize, minimize per metric ({len(metrics)})")
        return directions

    @model_validator(mode="after")
    def _prunable(self) -> Study:
        if len(self.metrics) > 1 and self.pruner != "none":
            raise _bad("Optuna cannot prune multi-objective studies (allowed: none)", at="pruner")
        return self


class Param(_Model):
    """One searched config key: the kinds below, told apart by ``type``."""

    key: str = Field("", exclude=True, description="the dotted config path it is listed under in ``space``")
    type: str = Field(description="the kind of parameter: float, int, categorical or subset")
    when: Annotated[dict[str, list[Any]], PlainValidator(_when)] = Field({},
        description="sampled where earlier ones took these")

    @classmethod
    def kind(cls) -> str:
        return get_args(cls.model_fields["type"].annotation)[0]

    @classmethod
    def _unknown(cls) -> str:
        return f"unknown for {cls.kind()} (allowed: {', '.join(sorted(cls._keys()))})"

    def identity(self) -> dict[str, Any]:
        """The parameter as a study records it (``search.study.identity``): its fields as written."""
        return self.model_dump(mode="json")

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this parameter is sampled, given the values sampled before it."""
        return all(values.get(other) in allowed for other, allowed in self.when.items())

    @abstractmethod
    def distributions(self) -> dict[str, BaseDistribution]:
        """The Optuna parameters it becomes, by name: what a trial records as its distributions."""

    @abstractmethod
    def values(self) -> list[Any]:
        """The values worth checking against the base before any trial (the extremes of what it samples)."""

    @abstractmethod
    def suggest(self, trial: optuna.Trial) -> Any:
        """One value, sampled by ``trial`` under the Optuna names of ``distributions``."""

    @abstractmethod
    def grid(self) -> dict[str, list[Any]]:
        """GridSampler's points for each of its Optuna parameters."""


class _Range(Param):
    """``low`` to ``high``, both inclusive; ``log`` samples on a log scale, ``step`` on a lattice."""

    low: _Number = Field(None, description="required")
    high: _Number = Field(None, description="required, >= low")
    log: _Bool = Field(False, description="needs low > 0 and no step")
    step: _NumberStep = Field(None, description="the grid sampler needs one for floats")

    @model_validator(mode="after")
    def _bounds(self) -> _Range:
        if self.low is None or self.high is None or self.low > self.high:
            raise _bad("needs low <= high (both inclusive)")
        if self.log and (self.step is not None or self.low <= 0):
            raise _bad("needs low > 0 and no step", at="log")
        return self

    def values(self) -> list[Any]:
        d = self.distributions()[self.key]  # Optuna's: high lowered onto the last step
        return [d.low, d.high]

    def grid(self) -> dict[str, list[Any]]:
        d = self.distributions()[self.key]
        if d.step is None:
            raise SpaceError(f"'space.{self.key}.step': grid needs a step for float parameters")
        count = (d.high - d.low) / d.step
        if not count < MAX_GRID:
            raise SpaceError(f"'space.{self.key}.step': grid needs at most {MAX_GRID} points per parameter "
                             f"(got {count:.3g}; a larger step)")
        return {self.key: [d.low + i * d.step for i in range(round(count) + 1)]}


class Float(_Range):
    type: Literal["float"] = Field(description="float: a float from low to high")

    def distributions(self) -> dict[str, BaseDistribution]:
        return {self.key: FloatDistribution(self.low, self.high, log=self.log, step=self.step)}

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


class Int(_Range):
    type: Literal["int"] = Field(description="int: an integer from low to high")
    low: _Integer = Field(None, description="required")
    high: _Integer = Field(None, description="required, >= low")
    step: _IntegerStep = Field(None, description="null: 1")

    def distributions(self) -> dict[str, BaseDistribution]:
        return {self.key: IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)}

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)


class _Choice(Param):
    choices: _ChoiceList = Field(None, validate_default=True, description="required")

    def grid(self) -> dict[str, list[Any]]:
        return {name: list(d.choices) for name, d in self.distributions().items()}


class Categorical(_Choice):
    """One of ``choices``."""

    type: Literal["categorical"] = Field(description="categorical: one of choices")

    def distributions(self) -> dict[str, BaseDistribution]:
        return {self.key: CategoricalDistribution(self.choices)}

    def values(self) -> list[Any]:
        return list(self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        return trial.suggest_categorical(self.key, self.choices)


class Subset(_Choice):
    """Any subset of ``choices`` (head positions): one yes/no Optuna parameter ``key:choice`` each, so a
    sampler models each member on its own."""

    type: Literal["subset"] = Field(description="subset: any subset of choices, one yes/no each")

    def distributions(self) -> dict[str, BaseDistribution]:
        return {f"{self.key}:{c}": CategoricalDistribution((False, True)) for c in self.choices}

    def values(self) -> list[Any]:
        """Each member alone and the whole set."""
        return [[c] for c in self.choices] + [list(self.choices)]

    def suggest(self, trial: optuna.Trial) -> list[Any]:
        return [c for c in self.choices if trial.suggest_categorical(f"{self.key}:{c}", [False, True])]


KINDS = (Float, Int, Categorical, Subset)
TYPES = tuple(kind.kind() for kind in KINDS)
AnyParam = Annotated[Float | Int | Categorical | Subset, Field(discriminator="type")]


class SpaceFile(_Model):
    """A space file as written; ``load_space`` resolves it into a ``Space``."""

    study: Study = Field(None, validate_default=True, description="required: at least a name")
    base: Annotated[dict[str, Any], _mapping("must be a trainer config mapping")] = Field({},
        description="trainer config")
    final: Annotated[dict[str, Any], _mapping("must map dotted config keys to values")] = Field({},
        description="for retraining")
    space: dict[str, AnyParam] = Field(None, validate_default=True,
        description="required; keyed by dotted config path")

    @classmethod
    def _unknown(cls) -> str:
        return f"unknown section (allowed: {', '.join(cls._keys())})"

    @field_validator("study", mode="before")
    @classmethod
    def _study(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _bad("must be a mapping with at least 'name'")
        return value

    @field_validator("space", mode="before")
    @classmethod
    def _typed(cls, specs: Any) -> Any:
        """Each parameter names one of ``TYPES`` (which the union's own error would not list)."""
        if specs is not None and not isinstance(specs, dict):
            raise _bad(f"must map dotted config keys to parameters (got {quote(specs)})")
        if not specs:
            raise _bad("needs at least one parameter")
        for key, spec in specs.items():
            if not isinstance(spec, dict) or spec.get("type") not in TYPES:
                raise _bad(f"required (allowed: {', '.join(TYPES)})", at=f"{key}.type")
        return specs

    @field_validator("space")
    @classmethod
    def _keyed(cls, params: dict[str, Param]) -> dict[str, Param]:
        """Each parameter learns its key; ``when`` may name only parameters listed before it."""
        earlier: list[str] = []
        for key, param in params.items():
            param.key = key
            for other in param.when:
                if other not in earlier:
                    raise _bad(f"{quote(other)} must be a parameter listed earlier "
                               f"(allowed: {', '.join(earlier) or 'none'})", at=f"{key}.when")
            earlier.append(key)
        return params


@dataclass
class Space:
    """A loaded space: its study, the trials' base (``--base`` and ``--set`` applied), ``final`` with the
    retraining's epochs, and the parameters in file order."""

    path: Path
    study: Study
    base: dict[str, Any]
    final: dict[str, Any]
    params: list[Param]
    recipe: tuple[str, dict[str, Any]] | None = None  # (file, trainer config) that ``study.recipe`` or ``--base`` names
    on_test: ClassVar[bool] = False  # trials score on the validation split each epoch (confirm's: test, once)

    def carries_heads(self) -> bool:
        """The trials train with shortcut heads (in the base or through a searched heads key)."""
        return bool(self.config({}).heads.exits) or any(p.key.startswith("heads.") for p in self.params)

    def control(self) -> Space | None:
        """The control arm: a companion study, ``<name>.control``, that tunes this space's other parameters
        (optimizer, timesteps, neuron, ...) with heads off, with the same sampler, pruner and seeds, so that
        "did the heads help?" compares two arms tuned alike. With ``study.control: false``, or nothing else
        to tune, it is one run of the base without heads. None where the trials carry no heads, or with
        ``study.control: 0``."""
        if not self.carries_heads() or (self.study.control is not False and self.study.control == 0):
            return None
        params = [] if self.study.control is False else [
            p for p in self.params if not p.key.startswith(HEAD_KEYS) and not any(k.startswith(HEAD_KEYS) for k in p.when)]
        study = self.study.model_copy(update={
            "name": f"{self.study.name}{CONTROL}", "n_trials": (self.study.control or self.study.n_trials) if params else 1,
            "sampler": self.study.sampler if params else "tpe", "pruner": self.study.pruner if params else "none",
            "scheduler": self.study.scheduler if params else None, "control": False, "recipe": None})
        return Space(self.path, study, with_values(self.base, {"heads.exits": []}), self.final, params)

    def values(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict[str, Any]:
        """A trial's values: sampled by its sampler (a queued trial's are fixed)."""
        return suggest(trial, self.params)

    def arms(self) -> list[Space]:
        """The studies one search runs: this space's, then its control arm's (if any)."""
        return [self, *filter(None, [self.control()])]

    def config(self, values: dict[str, Any]) -> Config:
        """The trainer config of one trial: base plus the sampled values at their dotted paths."""
        return build(with_values(self.base, values), f"{self.path}: trial config")

    def min_epochs(self) -> int:
        """Epochs every trial trains before a pruner may stop it.

        A third of the base epochs unless ``study.min_epochs`` says otherwise: in the first epochs of a
        lambda schedule that starts on the heads, the main output's accuracy is near chance for every
        trial and ranks them at random (measured on digits, see docs/benchmarks/search_efficiency.md).
        """
        epochs = self.config({}).optim.epochs
        return min(epochs, self.study.min_epochs or max(1, round(epochs / 3)))

    def final_config(self, data: dict[str, Any]) -> Config:
        return build(with_values(data, self.final), f"{self.path}: final")


def _base(path: Path, file: SpaceFile, base: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial config's base and the ``final`` overrides. ``base`` (a trainer config file) replaces the
    space's own, and with it the space's ``final.optim.epochs``, which was chosen for its own base: the
    final retraining runs the base's full length (``optim.epochs`` as written, before ``--set``) unless the
    space says otherwise."""
    data, final = file.base, file.final
    if base is not None:
        try:
            data = read_yaml(base)
        except ConfigError as err:
            raise SpaceError(f"--base: {err}") from None
        if not isinstance(data, dict):
            raise SpaceError(f"--base: {base}: expected a trainer config mapping")
        final = {k: v for k, v in final.items() if k != "optim.epochs"}
    try:
        full = build(copy.deepcopy(data), str(base) if base else f"{path}: base").optim.epochs
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    return data, {"optim.epochs": full, **final}


def load_space(path: str | Path, overrides: list[str] = (), base: str | Path | None = None) -> Space:
    """Read and validate a space file; ``base`` (a trainer config file) replaces its ``base`` section;
    ``overrides`` (``key=value``) apply to the base of the trials."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with study, base, final, space")
    try:
        file = SpaceFile.model_validate(raw)
    except ValidationError as err:
        raise SpaceError(_one_line(err, path)) from None
    data, final = _base(path, file, Path(base) if base is not None else None)
    params = list(file.space.values())
    if file.study.sampler == "grid":
        if any(p.when for p in params):
            raise _err(path, "study.sampler", "grid cannot sample conditional ('when') parameters")
        try:
            grid(params)
        except SpaceError as err:
            raise SpaceError(f"{path}: {err}") from None
    try:
        for item in overrides:
            set_dotted(data, *parse_override(item))
    except ConfigError as err:
        raise SpaceError(f"{path}: {err}") from None
    space = Space(path, file.study, data, final, params, _recipe(path, file.study.recipe, base))
    _check_configs(space)
    return space


def _recipe(path: Path, recipe: str | None, base: Path | None) -> tuple[str, dict[str, Any]] | None:
    """The trainer config that ``study.recipe`` names (a path relative to the space file), else the ``--base``
    file: what ``snn-search confirm`` retrains as published."""
    source = Path(os.path.normpath(path.parent / recipe)) if recipe else base
    if source is None:
        return None
    try:
        data = read_yaml(source)
        build(copy.deepcopy(data), str(source))
    except ConfigError as err:
        raise SpaceError(f"{path}: 'study.recipe': {err}" if recipe else f"--base: {err}") from None
    return str(source), data


def _check_configs(space: Space) -> None:
    """Fail before any trial if the base, a sampled value or ``final`` makes an invalid config.

    Every value of every parameter is checked against the base, and every pair of values of two
    parameters against each other (a head exit against each architecture, say); each distinct model runs
    once on a dry batch (``trainer.probe``), so a model that cannot be built or run fails here too.
    """
    values = {p.key: p.values() for p in space.params}
    source = f"{space.path}: trial config"
    try:
        cfg = space.config({})
        check(cfg, source)
        for key, some in values.items():
            for value in some:
                check(space.config({key: value}), source)
        for p, q in itertools.combinations(values, 2):
            for a, b in itertools.product(values[p], values[q]):
                check(space.config({p: a, q: b}), source)
        check(space.final_config(cfg.to_dict()), f"{space.path}: final")
    except UserError as err:  # a config the model rejects, a model that cannot run, an exit it lacks
        raise SpaceError(str(err)) from None


def suggest(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    """Sample one value per active parameter; subsets become one boolean per choice."""
    values: dict[str, Any] = {}
    for p in params:
        if p.active(values):
            values[p.key] = p.suggest(trial)
    return values

"""Search-space files: schema, validation and Optuna suggestions.

A space file has four sections (see README "Space files"):

    study:  name, direction(s), metric(s), sampler, pruner, min_epochs, n_trials, timeout, seed, storage,
            heartbeat, max_retry, artifacts, baseline
    base:   a full trainer config (same format as ``python -m trainer --config``)
    final:  dotted overrides applied when the best config is retrained at full length (``optim.epochs``:
            the base's own unless given; ``--base FILE`` swaps in a trainer config as the base)
    space:  parameters keyed by dotted config path, e.g. ``lambda.start: {type: float, low: 0.1, high: 1}``

Parameter types: ``float``/``int`` (inclusive ``low``/``high``, optional ``log`` or ``step``),
``categorical`` (``choices``) and ``subset`` (any subset of ``choices``, one yes/no parameter each;
used for head positions). ``when: {other.key: [values]}`` makes a parameter conditional on an earlier one.
Every problem is a ``SpaceError`` whose one-line message names the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from search.metrics import METRICS
from search.pruners import PRUNERS
from search.samplers import SAMPLERS, grid
from trainer.errors import UserError
from trainer.config import Config, ConfigError, build, parse_override, read_yaml, set_dotted, with_values

TYPES = ("float", "int", "categorical", "subset")
STUDY_KEYS = ("name", "direction", "metric", "sampler", "pruner", "min_epochs", "n_trials", "timeout", "seed",
              "storage", "heartbeat", "max_retry", "artifacts", "baseline")
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
    "subset": {"type", "choices", "when"},
}


class SpaceError(UserError):
    """A bad space file; the message is one line."""


@dataclass
class Param:
    key: str  # dotted config path
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    metrics: list[str]
    directions: list[str]
    sampler: str = "tpe"
    pruner: str = "hyperband"
    min_epochs: int | None = None  # epochs before a trial can be pruned; None: a third of the base epochs
    n_trials: int = 20
    timeout: float | None = None
    seed: int | None = 0
    storage: str | None = None
    heartbeat: int = 10  # seconds between RUNNING-trial heartbeats; see storage.timeouts for the grace period
    max_retry: int = 2  # times a trial whose worker died is queued again
    artifacts: str | None = None  # folder of the artifact store; None: <study dir>/artifacts
    baseline: bool = True  # run the base config without heads once, to measure what the heads gained


@dataclass
class Space:
    path: Path
    study: Study
    base: dict[str, Any]
    final: dict[str, Any]
    params: list[Param]

    def config(self, values: dict[str, Any]) -> Config:
        """The trainer config of one trial: base plus the sampled values at their dotted paths."""
        return build(with_values(self.base, values), f"{self.path}: trial config")

    def min_epochs(self) -> int:
        """Epochs every trial trains before a pruner may stop it.

        A third of the base epochs unless ``study.min_epochs`` says otherwise: in the first epochs of a
        lambda schedule that starts on the heads, the main output's accuracy is near chance for every
        trial and ranks them at random (measured on digits, see README "Search efficiency").
        """
        epochs = self.config({}).optim.epochs
        return min(epochs, self.study.min_epochs or max(1, round(epochs / 3)))

    def final_config(self, data: dict[str, Any]) -> Config:
        return build(with_values(data, self.final), f"{self.path}: final")


def _err(path: Path, key: str, message: str) -> SpaceError:
    return SpaceError(f"{path}: '{key}': {message}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _parse_study(path: Path, raw: Any) -> Study:
    if not isinstance(raw, dict):
        raise _err(path, "study", "must be a mapping with at least 'name'")
    for key in raw:
        if key not in STUDY_KEYS:
            raise _err(path, f"study.{key}", f"unknown key (allowed: {', '.join(STUDY_KEYS)})")
    if not isinstance(raw.get("name"), str) or not raw["name"].replace("-", "_").isidentifier():
        raise _err(path, "study.name", "required: letters, digits, '_' or '-'")
    metrics = _as_list(raw.get("metric", "val_acc"))
    for m in metrics:
        if m not in METRICS:
            raise _err(path, "study.metric", f"unknown metric {m!r} (allowed: {', '.join(METRICS)})")
    directions = _as_list(raw.get("direction", [METRICS[m].direction for m in metrics]))
    if len(directions) != len(metrics) or any(d not in ("maximize", "minimize") for d in directions):
        raise _err(path, "study.direction", f"need one of maximize, minimize per metric ({len(metrics)})")
    study = Study(raw["name"], metrics, directions)
    for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key in raw:
            if raw[key] not in choices:
                raise _err(path, f"study.{key}", f"got {raw[key]!r} (allowed: {', '.join(choices)})")
            setattr(study, key, raw[key])
    for key, low in (("n_trials", 1), ("heartbeat", 1), ("min_epochs", 1), ("max_retry", 0)):
        if key in raw and not (raw[key] is None and getattr(study, key) is None):  # null keeps a null default
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < low:
                raise _err(path, f"study.{key}", f"must be an integer >= {low} (got {raw[key]!r})")
            setattr(study, key, raw[key])
    if raw.get("timeout") is not None:
        if not isinstance(raw["timeout"], (int, float)) or raw["timeout"] <= 0:
            raise _err(path, "study.timeout", f"must be seconds > 0 or null (got {raw['timeout']!r})")
        study.timeout = float(raw["timeout"])
    if "seed" in raw:
        if raw["seed"] is not None and not isinstance(raw["seed"], int):
            raise _err(path, "study.seed", f"must be an integer or null (got {raw['seed']!r})")
        study.seed = raw["seed"]
    if "baseline" in raw:
        if not isinstance(raw["baseline"], bool):
            raise _err(path, "study.baseline", f"must be true or false (got {raw['baseline']!r})")
        study.baseline = raw["baseline"]
    for key in ("storage", "artifacts"):
        if raw.get(key) is not None:
            setattr(study, key, str(raw[key]))
    if len(metrics) > 1 and study.pruner != "none":
        raise _err(path, "study.pruner", "Optuna cannot prune multi-objective studies (allowed: none)")
    return study


def _number(path: Path, key: str, spec: dict, name: str, integer: bool) -> float | None:
    value = spec.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _err(path, f"space.{key}.{name}", f"must be {'an integer' if integer else 'a number'} (got {value!r})")
    return value


def _parse_param(path: Path, key: str, spec: Any, earlier: dict[str, Param]) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise _err(path, f"space.{key}.type", f"required (allowed: {', '.join(TYPES)})")
    kind = spec["type"]
    for name in spec:
        if name not in PARAM_KEYS[kind]:
            raise _err(path, f"space.{key}.{name}", f"unknown for {kind} (allowed: {', '.join(sorted(PARAM_KEYS[kind]))})")
    param = Param(key, kind)
    if kind in ("float", "int"):
        integer = kind == "int"
        param.low, param.high = (_number(path, key, spec, n, integer) for n in ("low", "high"))
        if param.low is None or param.high is None or param.low > param.high:
            raise _err(path, f"space.{key}", "needs low <= high (both inclusive)")
        param.step = _number(path, key, spec, "step", integer)
        param.log = bool(spec.get("log", False))
        if param.log and (param.step is not None or param.low <= 0):
            raise _err(path, f"space.{key}.log", "needs low > 0 and no step")
    else:
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(path, f"space.{key}.choices", "must be a non-empty list")
        param.choices = choices
    for other, values in (spec.get("when") or {}).items():
        if other not in earlier:
            raise _err(path, f"space.{key}.when", f"{other!r} must be a parameter listed earlier "
                       f"(allowed: {', '.join(earlier) or 'none'})")
        param.when[other] = _as_list(values)
    return param


def _base(path: Path, raw: dict[str, Any], base: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial config's base and the ``final`` overrides. ``base`` (a trainer config file) replaces the
    space's own, and with it the space's ``final.optim.epochs``, which was chosen for its own base: the
    final retraining runs the base's full length (``optim.epochs`` as written, before ``--set``) unless the
    space says otherwise."""
    data, final = raw.get("base") or {}, raw.get("final") or {}
    if not isinstance(final, dict):
        raise _err(path, "final", "must map dotted config keys to values")
    if base is not None:
        try:
            data = read_yaml(base)
        except ConfigError as err:
            raise SpaceError(f"--base: {err}") from None
        if not isinstance(data, dict):
            raise SpaceError(f"--base: {base}: expected a trainer config mapping")
        final = {k: v for k, v in final.items() if k != "optim.epochs"}
    elif not isinstance(data, dict):
        raise _err(path, "base", "must be a trainer config mapping")
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
    for key in raw:
        if key not in ("study", "base", "final", "space"):
            raise _err(path, key, "unknown section (allowed: study, base, final, space)")
    study = _parse_study(path, raw.get("study"))
    base, final = _base(path, raw, Path(base) if base is not None else None)
    params: dict[str, Param] = {}
    for key, spec in (raw.get("space") or {}).items():
        params[key] = _parse_param(path, key, spec, params)
    if not params:
        raise _err(path, "space", "needs at least one parameter")
    if study.sampler == "grid":
        if any(p.when for p in params.values()):
            raise _err(path, "study.sampler", "grid cannot sample conditional ('when') parameters")
        try:
            grid(list(params.values()))
        except SpaceError as err:
            raise SpaceError(f"{path}: {err}") from None
    try:
        for item in overrides:
            set_dotted(base, *parse_override(item))
    except ConfigError as err:
        raise SpaceError(f"{path}: {err}") from None
    space = Space(path, study, base, final, list(params.values()))
    _check_configs(space)
    return space


def _values(p: Param) -> list[Any]:
    """The values of ``p`` worth checking: both bounds, each choice, each subset member and the whole set."""
    if p.type == "subset":
        return [[c] for c in p.choices] + [list(p.choices)]
    return list(p.choices) if p.type == "categorical" else [p.low, p.high]


def _check_configs(space: Space) -> None:
    """Fail before any trial if the base, a sampled value or ``final`` makes an invalid config.

    Every value of every parameter is checked against the base, and every pair of values of two
    parameters against each other (a head exit against each architecture, say).
    """
    try:
        cfg = space.config({})
        for p in space.params:
            for value in _values(p):
                space.config({p.key: value})
        for p, q in itertools.combinations(space.params, 2):
            for a, b in itertools.product(_values(p), _values(q)):
                space.config({p.key: a, q.key: b})
        space.final_config(cfg.to_dict())
    except ConfigError as err:
        raise SpaceError(str(err)) from None


def _active(param: Param, values: dict[str, Any]) -> bool:
    return all(values.get(other) in allowed for other, allowed in param.when.items())


def suggest(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    """Sample one value per active parameter; subsets become one boolean per choice."""
    values: dict[str, Any] = {}
    for p in params:
        if not _active(p, values):
            continue
        if p.type == "float":
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif p.type == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, p.choices)
        else:
            values[p.key] = [c for c in p.choices if trial.suggest_categorical(f"{p.key}:{c}", [False, True])]
    return values

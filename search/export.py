"""Export the best trial(s) of a study as trainer configs.

    python search/export.py --study NAME [--storage URL] [--top-k K | --pareto] [--out DIR]

Writes ``studies/<name>/best.yaml`` (and ``trial_<n>.yaml`` for each of the top-k / Pareto trials): a
trainer config with a ``provenance`` section (study, storage, trial, values, params, ``final`` overrides)
that ``python -m trainer --config`` and ``search/retrain.py`` accept. Only trials that ran every epoch
count: a run cut short by a scheduler is never picked over a full one.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import datetime  # noqa: E402

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from search.storage import STUDIES_DIR, default_url, open_storage  # noqa: E402


def is_full(trial: FrozenTrial) -> bool:
    """The trial completed all its configured epochs (not pruned, not stopped by a scheduler)."""
    config = trial.user_attrs.get("config")
    return (
        trial.state == TrialState.COMPLETE
        and config is not None
        and trial.user_attrs.get("epochs_run") == config["optim"]["epochs"]
        and not trial.user_attrs.get("truncated", False)
    )


def select(study: optuna.Study, top_k: int = 1, pareto: bool = False) -> list[FrozenTrial]:
    """Full trials, best first: top-k for one objective, the Pareto front for several."""
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
    if not full:
        raise ValueError(f"study {study.study_name!r} has no trial that completed all its epochs")
    if len(study.directions) > 1 or pareto:
        if len(study.directions) == 1:
            raise ValueError("--pareto needs a multi-objective study")
        front = [t for t in full if not any(_dominates(o, t, study.directions) for o in full)]
        return sorted(front, key=lambda t: t.number)
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return sorted(full, key=lambda t: -sign * t.value)[:top_k]


def _dominates(a: FrozenTrial, b: FrozenTrial, directions: list) -> bool:
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def exported(study: optuna.Study, trial: FrozenTrial, storage_url: str) -> dict:
    config = dict(trial.user_attrs["config"])
    config["provenance"] = {
        "study": study.study_name,
        "storage": storage_url,
        "trial": trial.number,
        "metrics": study.user_attrs.get("metrics"),
        "values": trial.values,
        "params": trial.params,
        "final": study.user_attrs.get("final", {}),
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return config


def load_study(study_name: str, storage_url: str) -> optuna.Study:
    """An existing study; ValueError (one line) if the database or the study is missing."""
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).exists():
        raise ValueError(f"storage {storage_url}: no such database file")
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except KeyError:
        raise ValueError(f"storage {storage_url}: no study named {study_name!r}") from None


def export(study_name: str, storage_url: str, out_dir: Path, top_k: int = 1, pareto: bool = False) -> list[Path]:
    study = load_study(study_name, storage_url)
    trials = select(study, top_k, pareto)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "best.yaml"]
    paths[0].write_text(yaml.safe_dump(exported(study, trials[0], storage_url), sort_keys=False))
    if top_k > 1 or pareto:
        for trial in trials:
            path = out_dir / f"trial_{trial.number}.yaml"
            path.write_text(yaml.safe_dump(exported(study, trial, storage_url), sort_keys=False))
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python search/export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", help="default: sqlite:///studies/<study>.db")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--pareto", action="store_true", help="all Pareto-optimal trials (multi-objective)")
    parser.add_argument("--out", type=Path, help="default: studies/<study>/")
    args = parser.parse_args(argv)
    url = args.storage or default_url(args.study)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k: must be >= 1 (got {args.top_k})")
        paths = export(args.study, url, args.out or STUDIES_DIR / args.study, args.top_k, args.pareto)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

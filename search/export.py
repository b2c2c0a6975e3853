"""Export the best trial(s) of a study as trainer configs.

    snn-search export --study NAME [--storage URL] [--top-k K | --pareto] [--out DIR]

Writes ``studies/<name>/best.yaml`` (and ``trial_<n>.yaml`` for each of the top-k / Pareto trials): a
trainer config with a ``provenance`` section (study, storage, trial, values, params, ``final`` overrides)
that ``python -m trainer --config`` and ``search/retrain.py`` accept, and ``best_model.pt``, the best
trial's trained model (without heads) from the study's artifact store. Only trials that ran every
epoch count: a run cut short by a scheduler is never picked over a full one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datetime

import optuna
import yaml
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import FrozenTrial

from search import compat
from search.storage import artifact_store, default_url, study_dir
from search.study import load_study, select
from trainer.checkpoint import MODEL_FILE
from trainer.errors import Parser, UserError, command


def exported(study: optuna.Study, trial: FrozenTrial, storage_url: str) -> dict:
    """The trial's config and provenance; a PBT member's lambda is the schedule it realised, epoch by
    epoch (its donors' epochs before each copy included), as ``lambda.schedule: table``."""
    config = dict(trial.user_attrs["config"])
    if "lambda_trajectory" in trial.user_attrs:
        config["lambda"] = {**config["lambda"], "schedule": "table", "fraction": 1.0,
                            "table": trial.user_attrs["lambda_trajectory"]}
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


def copy_model(study: optuna.Study, trial: FrozenTrial, path: Path) -> bool:
    """Copy the trial's ``model.pt`` artifact to ``path``; False if the trial kept none."""
    if "artifacts" not in study.user_attrs:  # a study from before artifacts
        return False
    store = artifact_store(study.user_attrs["artifacts"])
    meta = next((m for m in get_all_artifact_meta(trial, storage=compat.storage(study)) if m.filename == MODEL_FILE), None)
    if meta is None:
        return False
    path.unlink(missing_ok=True)
    download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
    return True


def export(study_name: str, storage_url: str, out_dir: Path, top_k: int = 1, pareto: bool = False) -> list[Path]:
    study = load_study(study_name, storage_url)
    trials = select(study, top_k, pareto)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "best.yaml"]
    paths[0].write_text(yaml.safe_dump(exported(study, trials[0], storage_url), sort_keys=False))
    if copy_model(study, trials[0], out_dir / "best_model.pt"):
        paths.append(out_dir / "best_model.pt")
    if top_k > 1 or pareto:
        for trial in trials:
            path = out_dir / f"trial_{trial.number}.yaml"
            path.write_text(yaml.safe_dump(exported(study, trial, storage_url), sort_keys=False))
            paths.append(path)
    return paths


def make_parser(prog: str = "snn-search export") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", help="default: sqlite:///studies/<study>.db")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--pareto", action="store_true", help="all Pareto-optimal trials (multi-objective)")
    parser.add_argument("--out", type=Path, help="default: the study's folder, studies/<study>/")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    url = args.storage or default_url(args.study)
    if args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1 (got {args.top_k})")
    for path in export(args.study, url, args.out or study_dir(url, args.study), args.top_k, args.pareto):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

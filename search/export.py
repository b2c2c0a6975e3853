"""Export the best trial(s) of a study as trainer configs.

    snn-search export --study NAME [--storage URL] [--top-k K | --pareto] [--out DIR]

Writes ``studies/<name>/best.yaml`` (and ``trial_<n>.yaml`` for each of the top-k / Pareto trials): a
trainer config with a ``provenance`` section (study, storage, trial, values, params, ``final`` overrides)
that ``python -m trainer --config`` and ``search/retrain.py`` accept, and ``best_model.pt``, the best
trial's trained model (without heads) from the study's artifact store. Only trials that ran every
epoch count: a run cut short by a scheduler is never picked over a full one. Where ``snn-search confirm``
ran, ``best.yaml`` is its winner over seeds instead (``provenance.confirmed`` says so): a trial of either
arm, or the recipe.
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
from search.finding import load_finding
from search.storage import artifact_store, default_url, study_dir
from search.study import companion, load_study, select, trial_config
from trainer.checkpoint import MODEL_FILE
from trainer.errors import Parser, UserError, command


def exported(study: optuna.Study, trial: FrozenTrial, storage_url: str) -> dict:
    """The trial's config and provenance; a PBT member's lambda is the schedule it realised, epoch by
    epoch (its donors' epochs before each copy included), as ``lambda.schedule: table``."""
    config = trial_config(trial)
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
    store = artifact_store(study.user_attrs["artifacts"])
    meta = next((m for m in get_all_artifact_meta(trial, storage=compat.storage(study)) if m.filename == MODEL_FILE), None)
    if meta is None:
        return False
    path.unlink(missing_ok=True)
    download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
    return True


def confirmed(study: optuna.Study, storage_url: str) -> tuple[optuna.Study, FrozenTrial | None, dict] | None:
    """Where ``snn-search confirm`` ran: (the winner's study, its trial or None for the recipe, its exported
    config, whose provenance says it was confirmed)."""
    finding = load_finding(study)
    if finding is None or not finding.results:
        return None
    winner = next(r for r in finding.results if r.label == finding.winner)
    note = {"label": winner.label, "test_acc_mean": winner.mean, "test_acc_sd": winner.sd, "seeds": winner.seeds,
            "versus_control": next((c.verdict for c in finding.comparisons if c.label == winner.label),
                                   "it is the control"),
            "date": finding.date}
    if winner.arm == "recipe":  # as confirmed: already at full length, so no ``final`` to apply
        config = {**winner.config, "provenance": {"study": study.study_name, "storage": storage_url, "recipe": True,
                                                  "confirmed": note}}
        return study, None, config
    arm = companion(study) if winner.arm == "control" else study
    trial = arm.trials[winner.trial]
    config = exported(arm, trial, storage_url)
    config["provenance"]["confirmed"] = note
    return arm, trial, config


def export(study_name: str, storage_url: str, out_dir: Path, top_k: int = 1, pareto: bool = False) -> list[Path]:
    """``best.yaml`` (the confirmed winner where ``snn-search confirm`` ran, else the best full trial) and its
    model; with ``top_k`` or ``pareto`` also ``trial_<n>.yaml`` for each of those trials."""
    study = load_study(study_name, storage_url)
    trials = select(study, top_k, pareto)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "best.yaml"]
    winner = confirmed(study, storage_url) if not pareto else None
    arm, best, config = winner or (study, trials[0], exported(study, trials[0], storage_url))
    paths[0].write_text(yaml.safe_dump(config, sort_keys=False))
    (out_dir / "best_model.pt").unlink(missing_ok=True)  # never a model of another config than best.yaml's
    if best is not None and copy_model(arm, best, out_dir / "best_model.pt"):
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

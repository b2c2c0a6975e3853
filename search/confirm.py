"""Confirm a search's finding over seeds at full length: ``snn-search confirm --study NAME``.

    snn-search confirm --study NAME [--storage URL] [--study-dir DIR] [--top-k 3] [--seeds 3] [--recipe FILE]
                       [--workers N | --backend ray]

A search ranks configs by one run each, at one seed, on the validation split. A claim needs more: the K
best configs of the heads arm, the control arm's best (the same network tuned alike without heads) and the
recipe (``study.recipe``, the search's ``--base`` file, or ``--recipe FILE``: its heads and lambda curve
as published) are each retrained at the study's full length (its ``final`` overrides) on train +
validation, once per seed, and scored once on the test split. The same seeds train every config, so each
config's difference to the control is paired seed by seed: its mean and a 95% confidence interval
(Student's t over the seeds), and a verdict read off the interval.

The retrainings are the trials of a companion study, ``<name>.confirm``, queued as fixed configs x seeds
(``enqueue_trial``): they run on the same workers and backends as a search, resume after a kill from their
last epoch, and show in optuna-dashboard. Running the command again queues only what is missing. The
finding goes to ``<study dir>/confirm.json``, the confirm study (``finding``, read by the report and the
note), and the output; ``snn-search export`` then exports the confirmed winner.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.budget import budget_lock, used
from search.finding import METRIC, Finding, Result, compare
from search.space import CONFIRM, CONTROL, Space, Study
from search.storage import arm_dir, default_url, open_storage, study_dir
from search.study import best_full, companion, create_study, load_study, select, trial_config
from trainer import stop
from trainer.config import Config, build, parse_override, read_yaml, with_values
from trainer.errors import Parser, UserError, command


@dataclass
class Confirmation(Space):
    """The confirm study as a space the workers run: no searched parameters; each trial's config and seed
    come from what ``enqueue_trial`` gave it, and it is scored once on the test split."""

    on_test: ClassVar[bool] = True
    overrides: dict[str, Any] = field(default_factory=dict)  # --set: where each retraining runs (run.device, ...)

    def values(self, trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
        if "confirm" not in trial.user_attrs:
            raise UserError(f"trial {trial.number} of {self.study.name} was not queued by snn-search confirm")
        return trial.user_attrs["confirm"]

    def config(self, values: dict[str, Any]) -> Config:
        if not values:  # the study's identity: the search's base
            return super().config({})
        return build(with_values(values["config"], {**self.overrides, "run.seed": values["seed"]}),
                     f"confirm: {values['label']}")


@dataclass(frozen=True)
class Candidate:
    """A config to confirm: ``key`` (its arm and trial) names it across runs of the command."""

    label: str
    arm: str  # heads, control or recipe
    trial: int | None  # the search trial it comes from; None for the recipe
    config: dict[str, Any]  # at full length on train + validation; run.seed is set per retraining

    @property
    def key(self) -> str:
        return f"{self.arm}:{self.trial}"


WHERE = ("run.device", "run.out_dir", "run.resume", "data.num_workers")  # how a trial ran, not what it was


def candidates(study: optuna.Study, top_k: int, recipe: dict[str, Any] | None, recipe_name: str | None
               ) -> list[Candidate]:
    """The K best configs with heads, the control arm's best and the recipe, at the study's full length (its
    ``final``) on train + validation, without where their trial ran (``--set`` says where they run now)."""
    full = {**study.user_attrs.get("final", {}), "data.val_fraction": 0}
    found = [Candidate(f"heads #{i + 1} (trial {t.number})", "heads", t.number, trial_config(t))
             for i, t in enumerate(select(study, top_k=top_k))]
    control = best_full(companion(study, CONTROL))
    if control is not None:
        found.append(Candidate(f"control (trial {control.number})", "control", control.number, trial_config(control)))
    if recipe is not None:
        found.append(Candidate(f"recipe ({recipe_name})", "recipe", None,
                               {k: v for k, v in recipe.items() if k != "provenance"}))
    out = []
    for c in found:
        config = with_values(c.config, full)
        for key in WHERE:
            section, name = key.split(".")
            config.get(section, {}).pop(name, None)
        out.append(Candidate(c.label, c.arm, c.trial, config))
    return out


def queue(confirm: optuna.Study, storage: optuna.storages.BaseStorage, url: str, configs: list[Candidate],
          seeds: int) -> None:
    """Queue each config x seed that the confirm study does not hold yet (finished, running or queued: a
    trial that failed for good is queued again), under the budget lock: two commands queue nothing twice."""
    with budget_lock(storage, url, confirm.study_name):
        have = {(t.user_attrs["confirm"]["key"], t.user_attrs["confirm"]["seed"])
                for t in confirm.get_trials(deepcopy=False) if "confirm" in t.user_attrs and t.state != TrialState.FAIL}
        for c in configs:
            for seed in range(seeds):
                if (c.key, seed) not in have:
                    confirm.enqueue_trial({}, user_attrs={"confirm": {"key": c.key, "label": c.label, "arm": c.arm,
                                                                      "trial": c.trial, "seed": seed,
                                                                      "config": c.config}})


def finding(study: optuna.Study, confirm: optuna.Study, configs: list[Candidate], seeds: int) -> Finding:
    """The confirm study's completed trials, gathered into the finding."""
    scores: dict[str, dict[int, float]] = {c.key: {} for c in configs}
    for t in confirm.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        c = t.user_attrs["confirm"]
        if c["key"] in scores and c["seed"] < seeds:
            scores[c["key"]][c["seed"]] = t.value
    results = []
    for c in configs:
        seed_list = sorted(scores[c.key])
        accs = [scores[c.key][s] for s in seed_list]
        if accs:
            results.append(Result(label=c.label, arm=c.arm, trial=c.trial, config=c.config, seeds=seed_list,
                                  test_acc=accs, mean=statistics.fmean(accs),
                                  sd=statistics.stdev(accs) if len(accs) > 1 else None))
    results.sort(key=lambda r: -r.mean)
    control = next((c for c in configs if c.arm == "control"), None)
    comparisons = [compare(c.label, scores[c.key], scores[control.key]) for c in configs
                   if control is not None and c.arm != "control" and scores[c.key] and scores[control.key]]
    return Finding(study=study.study_name, date=datetime.date.today().isoformat(),
                   epochs=build(configs[0].config).optim.epochs, results=results, comparisons=comparisons,
                   winner=results[0].label if results else "none")


def make_parser(prog: str = "snn-search confirm") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--study", required=True, help="the search's study (its heads arm)")
    parser.add_argument("--storage", help="default: sqlite:///studies/<study>.db")
    parser.add_argument("--study-dir", type=Path, help="default: beside a SQLite or journal file, else studies/<study>/")
    parser.add_argument("--top-k", type=int, default=3, help="best configs of the heads arm to confirm")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per config (0, 1, ...; the same for every config)")
    parser.add_argument("--recipe", type=Path, help="a trainer config to confirm as published (default: the "
                        "study's recipe, if it has one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="where each retraining runs, e.g. --set data.root=/data (not part of what is confirmed)")
    parser.add_argument("--backend", choices=["optuna", "ray"], default="optuna")
    parser.add_argument("--workers", type=int, help="local worker processes (optuna backend)")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set for the children of --workers
    return parser


def space_of(study: optuna.Study, path: Path, overrides: list[str]) -> Confirmation:
    """The confirm study's space: no parameters, one metric scored on the test split, the search's artifacts."""
    settings = Study(name="confirm").model_copy(update={
        "name": study.study_name + CONFIRM, "metrics": [METRIC], "directions": ["maximize"], "sampler": "random",
        "pruner": "none", "control": False, "artifacts": study.user_attrs["artifacts"]})
    return Confirmation(path, settings, {}, {}, [], overrides=dict(parse_override(o) for o in overrides))


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.top_k < 1 or args.seeds < 1:
        raise UserError(f"--top-k and --seeds: must be >= 1 (got {args.top_k}, {args.seeds})")
    if args.backend == "ray" and args.workers:
        raise UserError("--workers: for the optuna backend (Ray runs as many retrainings at once as it has CPUs)")
    url = args.storage or default_url(args.study)
    with stop.handling():
        try:
            code = confirm(args, url)
        except stop.Stopped:
            code = 0
        signum = stop.requested()
    if signum:
        if args.worker_index is None:
            print(f"{stop.WHY[signum]}: run the same command again to finish; finished seeds are kept",
                  file=sys.stderr, flush=True)
        return max(code, 128 + signum)
    return code


def confirm(args: argparse.Namespace, url: str) -> int:
    study = load_study(args.study, url)
    if study.study_name.endswith((CONTROL, CONFIRM)) or len(study.directions) > 1:
        raise UserError(f"--study {args.study}: confirm takes a search's study with one objective (its heads arm)")
    recipe, recipe_name = study.user_attrs.get("recipe"), study.user_attrs.get("recipe_file")
    if args.recipe is not None:
        recipe, recipe_name = read_yaml(args.recipe), str(args.recipe)
        build(dict(recipe), str(args.recipe))
    configs = candidates(study, args.top_k, recipe, recipe_name)
    root = args.study_dir or study_dir(url, args.study)
    storage = open_storage(url)
    space = space_of(study, Path(study.user_attrs["space_file"]), args.overrides)
    confirm_dir = arm_dir(root, study.study_name, space.study.name)
    confirm_study = create_study(space, storage, confirm_dir)
    if args.worker_index is None:
        queue(confirm_study, storage, url, configs, args.seeds)
        print(f"confirming {len(configs)} configs x {args.seeds} seeds at full length "
              f"({build(configs[0].config).optim.epochs} epochs on train + validation, scored once on the test "
              f"split): {', '.join(c.label for c in configs)}", flush=True)
    space.study.n_trials = used(confirm_study.get_trials(deepcopy=False))  # every ask pops a queued trial
    queued = confirm_study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    if not queued and args.worker_index is None:
        print(f"study {space.study.name!r}: every retraining has run", flush=True)
    elif args.workers and args.workers > 1 and args.worker_index is None:
        from search.workers import devices, launch

        code = launch(main, args, devices(None, args.workers))
        if stop.requested() or code:
            return code
    elif args.backend == "ray":
        from search.ray_backend import run as run_ray

        run_ray(space, storage, url, None, root=confirm_dir)
    else:
        from search.optuna_backend import Worker

        tag = "" if args.worker_index is None else f"w{args.worker_index} "
        Worker([space], storage, url, confirm_dir, tag, args.worker_index or 0).run(None)
    if args.worker_index is not None:
        return 0
    found = finding(study, confirm_study, configs, args.seeds)
    confirm_study.set_user_attr("finding", found.model_dump())
    root.mkdir(parents=True, exist_ok=True)
    (root / "confirm.json").write_text(json.dumps(found.model_dump(), indent=2) + "\n")
    from search.report import build as build_report, publish

    publish(study, build_report(study, dashboard=True))
    print(found.table())
    print(f"written: {root / 'confirm.json'} and the study's note in optuna-dashboard; `snn-search report --study "
          f"{args.study}` puts it into report.html, `snn-search export --study {args.study}` exports the winner",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

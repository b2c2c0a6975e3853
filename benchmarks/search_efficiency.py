"""TPE + Hyperband vs. random search without pruning, on a shipped space (offline digits by default), and
with ``--pbt`` population-based training over lambda on Ray against both.

    python benchmarks/search_efficiency.py [--space spaces/lambda_decay.yaml] [--trials 12] [--set key=value ...]
    python benchmarks/search_efficiency.py --pbt [--pbt-space spaces/lambda_pbt.yaml] --seeds 0 1 2

Both searches run the same number of trials in fresh SQLite studies, with different sampler seeds
(random: ``seed``, TPE: ``seed + 1000``), so TPE's random start-up trials are not random search's own. The table gives each one's best
value, the training epochs it spent in all, trials per minute (end to end, this process), and the
epochs TPE + Hyperband needed to first reach random search's best value, as a fraction of random
search's epochs. A second table says how well a trial's accuracy after k epochs ranks the random
search's trials by their final accuracy (Spearman's rho): a pruner deciding before that is informative
stops trials at random (see ``study.min_epochs``).

``--pbt`` adds a population (``--pbt-space``, whose base must be the space's, with ``study.population``
members training the same epochs as a trial) and a third table: each search's best config exported and
retrained at full length (the space's ``final``; ``--final-epochs`` for a quick look) on train +
validation, with its test accuracy. A population's members train side by side, so its epochs spent after
epoch e are population x e, and its best after epoch e is the best member's val acc then.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from optuna.trial import TrialState
from record import Column, Table, add_json_flag, write_json
from scipy.stats import spearmanr

from search.export import exported
from search.optuna_backend import run
from search.retrain import final_config
from search.space import load_space
from search.storage import open_storage
from trainer.fit import fit


def retrained(study, url: str, tmp: Path, epochs: int | None) -> float:
    """The test accuracy of the study's best config, exported and retrained as ``snn-search retrain`` does."""
    best = tmp / "best.yaml"
    best.write_text(yaml.safe_dump(exported(study, study.best_trial, url), sort_keys=False))
    overrides = [f"optim.epochs={epochs}"] if epochs else []
    return fit(final_config(best, overrides, tmp / "retrain")).test["test_acc"]


def search(space_path: str, overrides: list[str], sampler: str, pruner: str, trials: int, seed: int,
           final_epochs: int | None = None) -> dict:
    space = load_space(space_path, overrides)
    space.study.sampler, space.study.pruner, space.study.seed, space.study.n_trials = sampler, pruner, seed, trials
    space.study.control = 0  # the same fixed cost for both searches: left out of the comparison
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'study.db'}"
        t0 = time.perf_counter()
        (study,) = run(space, open_storage(url, space.study.heartbeat), url, None)
        seconds = time.perf_counter() - t0
        done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        test_acc = retrained(study, url, Path(tmp), final_epochs) if final_epochs is not False else None
    curve, curves, spent, best = [], [], 0, float("-inf")
    for t in sorted(done, key=lambda t: t.number):
        spent += t.user_attrs.get("epochs_run", 0)
        history = [h["val_acc"] for h in t.user_attrs.get("history", [])]
        # every trial is credited with the value it ended on (a pruned one: its last epoch), as a
        # random-search trial is; crediting a pruned trial's best epoch would favour the pruned search
        best = max(best, history[-1] if t.state == TrialState.PRUNED else t.value)
        curve.append((spent, best))
        if t.state == TrialState.COMPLETE:
            curves.append(history)
    return {"curve": curve, "epochs": spent, "best": best, "per_min": len(done) / seconds * 60, "seconds": seconds,
            "val_acc_curves": curves, "test_acc": test_acc}


def population(space_path: str, overrides: list[str], seed: int, final_epochs: int | None) -> dict:
    """One PBT population on a local Ray: the same figures as ``search``, its members side by side."""
    from search.ray_backend import run as run_ray

    space = load_space(space_path, overrides)
    space.study.seed, space.study.control = seed, 0
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'study.db'}"
        t0 = time.perf_counter()
        (study,) = run_ray(space, open_storage(url, space.study.heartbeat), url, None,
                           max_concurrent=space.study.population, root=Path(tmp) / "study")
        seconds = time.perf_counter() - t0
        members = [t for t in study.trials if t.state == TrialState.COMPLETE]
        test_acc = retrained(study, url, Path(tmp), final_epochs)
    epochs = len(members[0].user_attrs["history"])
    curve, best = [], float("-inf")
    for e in range(epochs):
        best = max(best, *(t.user_attrs["history"][e]["val_acc"] for t in members))
        curve.append((len(members) * (e + 1), best))
    copies = sum(e["trial"] == t.number for t in members for e in t.user_attrs["lineage"])
    return {"curve": curve, "epochs": len(members) * epochs, "best": max(t.value for t in members),
            "per_min": len(members) / seconds * 60, "seconds": seconds, "test_acc": test_acc, "copies": copies}


def reached(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((e for e, b in curve if b >= target), None)


def share(epochs: int | None, of: int) -> dict | None:
    return None if epochs is None else {"epochs": epochs, "of": of, "fraction": epochs / of}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="spaces/lambda_decay.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pbt", action="store_true", help="add a PBT population and retrain each search's best")
    parser.add_argument("--pbt-space", default="spaces/lambda_pbt.yaml")
    parser.add_argument("--final-epochs", type=int, help="--pbt: retrain this long (default: the space's final)")
    add_json_flag(parser)
    args = parser.parse_args()
    final = args.final_epochs if args.pbt else False
    rows = []
    for seed in args.seeds:
        rand = search(args.space, args.overrides, "random", "none", args.trials, seed, final)
        tpe = search(args.space, args.overrides, "tpe", "hyperband", args.trials, seed + 1000, final)
        pop = population(args.pbt_space, args.overrides, seed + 2000, final) if args.pbt else None
        rows.append((seed, rand, tpe, pop))
    searches = Table(f"{args.space}, {args.trials} trials each, val_acc "
                     "(a pruned trial counts the value it ended on)"
                     + (f"; PBT: {args.pbt_space}, its members side by side" if args.pbt else ""),
                     "seed", "search", Column("best val acc", "{:.3f}"), "epochs spent",
                     Column("trials/min", "{:.1f}"), Column("wall s", "{:.0f}"),
                     Column("epochs to reach random's best", "{0[epochs]} of {0[of]} = {0[fraction]:.0%}",
                            none="not reached"),
                     Column("epochs to reach TPE's best", "{0[epochs]} of {0[of]} = {0[fraction]:.0%}",
                            none="not reached"))
    print(f"\n# {searches.title}\n{searches.header()}")
    for seed, rand, tpe, pop in rows:
        # random search's row has no such cell: its best is what is to be reached; TPE's has no TPE cell
        print(searches.add(seed, "random, no pruning", rand["best"], rand["epochs"], rand["per_min"], rand["seconds"]))
        print(searches.add(seed, "TPE + Hyperband", tpe["best"], tpe["epochs"], tpe["per_min"], tpe["seconds"],
                           share(reached(tpe["curve"], rand["best"]), rand["epochs"])))
        if pop:
            print(searches.add(seed, f"PBT, population {pop['epochs'] // len(pop['curve'])}", pop["best"],
                               pop["epochs"], pop["per_min"], pop["seconds"],
                               share(reached(pop["curve"], rand["best"]), rand["epochs"]),
                               share(reached(pop["curve"], tpe["best"]), tpe["epochs"])))
    tables = [searches]
    if args.pbt:
        final_table = Table("each search's best config retrained at full length on train + validation"
                            + (f" ({args.final_epochs} epochs)" if args.final_epochs else " (the space's final)"),
                            "seed", "search", Column("best val acc", "{:.3f}"), Column("test acc", "{:.3f}"),
                            "PBT copies")
        print(f"\n# {final_table.title}\n{final_table.header()}")
        for seed, rand, tpe, pop in rows:
            print(final_table.add(seed, "random, no pruning", rand["best"], rand["test_acc"]))
            print(final_table.add(seed, "TPE + Hyperband", tpe["best"], tpe["test_acc"]))
            print(final_table.add(seed, "PBT", pop["best"], pop["test_acc"], pop["copies"]))
        tables.append(final_table)
    epochs = len(rows[0][1]["val_acc_curves"][0])
    ranks = Table("Spearman's rho of val acc after k epochs with the final val acc, random search's trials",
                  "seed", *(Column(f"k={k}", "{:+.2f}") for k in range(1, epochs)))
    print(f"\n# {ranks.title}\n{ranks.header()}")
    for seed, rand, _, _ in rows:
        curves = rand["val_acc_curves"]
        final = [c[-1] for c in curves]
        rhos = [float(spearmanr([c[k - 1] for c in curves], final)[0]) for k in range(1, epochs)]
        print(ranks.add(seed, *rhos))
    write_json(__file__, args, [*tables, ranks])


if __name__ == "__main__":
    main()

"""Which search finds the best config for its epochs, and does its winner hold up at full length?

    python benchmarks/search_efficiency.py [--space spaces/lambda_decay.yaml] [--trials 12] [--seeds 0 1 2]
                                           [--pbt [--pbt-space spaces/lambda_pbt.yaml]] [--confirm-seeds 3]
                                           [--workers 2] [--set KEY=VALUE]
    python benchmarks/search_efficiency.py --space spaces/deep_heads.yaml --trials 16 --pbt \\
        --pbt-space spaces/deep_heads_pbt.yaml --confirm-seeds 3

At equal epochs: random search runs ``--trials`` trials to the end (no pruning), and its epochs are the
budget; TPE + Hyperband runs trials until it has spent as many (a pruned trial costs less, so it runs
more); ``--pbt`` adds a population of ``--trials`` members (``--pbt-space``, whose base should be the
space's, its ``population`` overridden) that train side by side as long as a trial. Each search is a fresh
SQLite study run as a user runs one (``search/run.py --workers N``; PBT: ``--backend ray``), with sampler
seeds ``seed`` (random), ``seed + 1000`` (TPE) and ``seed + 2000`` (PBT's first population). Only TPE's
study runs the control arm (``<name>.control``: the space's parameters besides heads and lambda, tuned
without heads, as many trials as its heads arm); its epochs are counted apart.

The first table gives each search's best val acc (a pruned trial counts the value it ended on, as a
random-search trial does), the epochs it spent, and the epochs it needed to first reach random search's
and TPE's best. With ``--confirm-seeds K`` the second gives the finding: ``snn-search confirm`` on TPE's
study, with the random and PBT winners queued beside its own, so that each search's best, the control
arm's best and the space's recipe (``study.recipe``) are retrained at full length (the space's ``final``)
on train + validation at the same seeds 0..K-1 and scored once on the test split; each is compared with
the control and with the recipe, paired seed by seed (mean difference, 95% t interval). The last table
says how well a trial's val acc after k epochs ranks random search's trials by their final one
(Spearman's rho): a pruner deciding before that stops trials at random (``study.min_epochs``).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from record import Column, Table, add_json_flag, write_json
from scipy.stats import spearmanr

from search.confirm import candidates, finding, queue, space_of
from search.finding import Finding, compare
from search.space import CONTROL
from search.storage import arm_dir, open_storage, study_dir
from search.study import create_study, load_study

ROOT = Path(__file__).resolve().parents[1]
FOUND_BY = {"random": "random, no pruning", "heads": "TPE + Hyperband", "pbt": "PBT", "control": "control arm (TPE)",
            "recipe": "recipe"}


def variant(space: Path, tmp: Path, name: str, **study: object) -> Path:
    """The space file as a fresh study of its own: its study section changed, its recipe's path kept."""
    data = yaml.safe_load(space.read_text())
    data["study"] |= {"name": name, **study}
    if data["study"].get("recipe"):
        data["study"]["recipe"] = str((space.parent / data["study"]["recipe"]).resolve())
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snn(*args: str) -> None:
    """One of the project's commands, as a user runs it; its output goes to stderr (the tables to stdout)."""
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=sys.stderr,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def finished(study: optuna.Study) -> list[FrozenTrial]:
    return sorted((t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                  key=lambda t: t.number)


def spent(trials: list[FrozenTrial]) -> int:
    return sum(t.user_attrs.get("epochs_run", 0) for t in trials)


def search(space: Path, tmp: Path, name: str, sampler: str, pruner: str, seed: int, trials: int, budget: int | None,
           args: argparse.Namespace) -> dict:
    """A search of ``trials`` trials, or with ``budget`` of trials until it has spent that many epochs."""
    url = f"sqlite:///{tmp / name}.db"
    control = None if budget else 0  # TPE's study runs the control arm
    path = variant(space, tmp, name, sampler=sampler, pruner=pruner, seed=seed, control=control)
    sets = [f"--set={o}" for o in args.overrides]
    epochs = yaml.safe_load(path.read_text())["base"]["optim"]["epochs"]
    t0, n = time.perf_counter(), trials
    while True:
        snn("search/run.py", "--space", str(path), "--storage", url, "--n-trials", str(n), "--workers",
            str(args.workers), *sets)
        done = finished(load_study(name, url))
        if budget is None or spent(done) >= budget:
            break
        n += max(1, math.ceil((budget - spent(done)) / epochs))  # at least one trial more; pruned ones cost less
    seconds = time.perf_counter() - t0
    curve, best, curves, total = [], float("-inf"), [], 0
    for t in done:
        total += t.user_attrs.get("epochs_run", 0)
        history = [h["val_acc"] for h in t.user_attrs.get("history", [])]
        # every trial is credited with the value it ended on (a pruned one: its last epoch), as a
        # random-search trial is; crediting a pruned trial's best epoch would favour the pruned search
        best = max(best, history[-1] if t.state == TrialState.PRUNED else t.value)
        curve.append((total, best))
        if t.state == TrialState.COMPLETE:
            curves.append(history)
    arm = optuna.load_study(study_name=name + CONTROL, storage=url) if control is None else None
    return {"name": name, "url": url, "curve": curve, "epochs": total, "best": best, "trials": len(done),
            "seconds": seconds, "val_acc_curves": curves, "control_epochs": spent(finished(arm)) if arm else None}


def population(space: Path, tmp: Path, name: str, seed: int, members: int, args: argparse.Namespace) -> dict:
    """A PBT population of ``members`` on a local Ray: the same figures as ``search``, its members side by side."""
    url = f"sqlite:///{tmp / name}.db"
    path = variant(space, tmp, name, seed=seed, control=0, population=members)
    t0 = time.perf_counter()
    snn("search/run.py", "--space", str(path), "--storage", url, "--backend", "ray", "--max-concurrent",
        str(members), *(f"--set={o}" for o in args.overrides))
    seconds = time.perf_counter() - t0
    done = [t for t in load_study(name, url).get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    epochs = len(done[0].user_attrs["history"])
    curve, best = [], float("-inf")
    for e in range(epochs):
        best = max(best, *(t.user_attrs["history"][e]["val_acc"] for t in done))
        curve.append((len(done) * (e + 1), best))
    return {"name": name, "url": url, "curve": curve, "epochs": len(done) * epochs, "trials": len(done),
            "best": max(t.value for t in done), "seconds": seconds, "control_epochs": None}


def confirmed(searches: dict[str, dict], seeds: int, args: argparse.Namespace) -> Finding:
    """``snn-search confirm`` on TPE's study, the other searches' winners queued beside its own."""
    tpe = searches["heads"]
    study = load_study(tpe["name"], tpe["url"])
    storage = open_storage(tpe["url"])
    space = space_of(study, Path(study.user_attrs["space_file"]), [])
    confirm = create_study(space, storage, arm_dir(study_dir(tpe["url"], tpe["name"]), study.study_name,
                                                   space.study.name))
    others = [replace(c, arm=arm, label=c.label.replace("heads", arm)) for arm in ("random", "pbt") if arm in searches
              for c in candidates(load_study(searches[arm]["name"], searches[arm]["url"]), 1, None, None)]
    queue(confirm, storage, tpe["url"], others, seeds)
    snn("search/confirm.py", "--study", tpe["name"], "--storage", tpe["url"], "--top-k", "1", "--seeds",
        str(seeds), "--workers", str(args.workers))
    configs = candidates(study, 1, study.user_attrs.get("recipe"), study.user_attrs.get("recipe_file")) + others
    return finding(study, load_study(confirm.study_name, tpe["url"]), configs, seeds)


def reached(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((e for e, b in curve if b >= target), None)


def share(epochs: int | None, of: int) -> dict | None:
    return None if epochs is None else {"epochs": epochs, "of": of, "fraction": epochs / of}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="spaces/lambda_decay.yaml")
    parser.add_argument("--trials", type=int, default=12, help="random search's trials (and PBT's members)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one set of searches per seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pbt", action="store_true", help="add a PBT population")
    parser.add_argument("--pbt-space", default="spaces/lambda_pbt.yaml")
    parser.add_argument("--confirm-seeds", type=int, default=0,
                        help="confirm each search's best, the control's and the recipe at this many seeds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per search (one thread each)")
    add_json_flag(parser)
    args = parser.parse_args()
    space, pbt_space = Path(args.space).resolve(), Path(args.pbt_space).resolve()
    stem = space.stem
    searches = Table(f"{args.space}, equal epochs: random {args.trials} trials, TPE + Hyperband until as many "
                     "epochs" + (f", PBT ({args.pbt_space}) {args.trials} members" if args.pbt else "")
                     + "; val_acc (a pruned trial counts the value it ended on)",
                     "seed", "search", Column("best val acc", "{:.3f}"), "epochs spent", "trials",
                     Column("control arm epochs", "{}"), Column("wall s", "{:.0f}"),
                     *(Column(f"epochs to reach {of}'s best", "{0[epochs]} of {0[of]} = {0[fraction]:.0%}",
                              none="not reached") for of in ("random", "TPE")))
    found = Table(f"each search's best, the control arm's best and the recipe retrained at full length on train + "
                  f"validation, {args.confirm_seeds} seeds each, test acc; paired differences, 95% t intervals",
                  "seed", "config", "found by", Column("search epochs", "{}"),
                  Column("test acc (mean ± sd)", "{0[mean]:.4f} ± {0[sd]:.4f}"), "per seed",
                  *(Column(f"vs. {of}: mean, 95% CI", "{0[mean]:+.4f} [{0[low]:+.4f}, {0[high]:+.4f}]")
                    for of in ("control", "recipe")))
    ranks_rows = []
    print(f"# {searches.title}\n{searches.header()}", flush=True)
    findings = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            rand = search(space, tmp, f"{stem}_random_{seed}", "random", "none", seed, args.trials, None, args)
            tpe = search(space, tmp, f"{stem}_tpe_{seed}", "tpe", "hyperband", seed + 1000, args.trials,
                         rand["epochs"], args)
            runs = {"random": rand, "heads": tpe}  # keyed by the arm confirm gives each winner: TPE's study is "heads"
            if args.pbt:
                runs["pbt"] = population(pbt_space, tmp, f"{stem}_pbt_{seed}", seed + 2000, args.trials, args)
            for arm, r in runs.items():
                # random search's row has no "to reach" cell: its best is what is to be reached; TPE's has no TPE cell
                reach = [share(reached(r["curve"], target["best"]), target["epochs"])
                         for target in (rand, tpe)[:list(runs).index(arm)]]
                print(searches.add(seed, FOUND_BY[arm], r["best"], r["epochs"], r["trials"], r["control_epochs"],
                                   r["seconds"], *reach), flush=True)
            ranks_rows.append((seed, rand["val_acc_curves"]))
            if args.confirm_seeds:
                findings.append((seed, runs, confirmed(runs, args.confirm_seeds, args)))
    tables = [searches]
    if findings:
        print(f"\n# {found.title}\n{found.header()}")
        for seed, runs, result in findings:
            against = {c.label: c for c in result.comparisons}
            recipe = next((r for r in result.results if r.arm == "recipe"), None)
            for r in result.results:
                c = against.get(r.label)
                vs_recipe = (compare(r.label, dict(zip(r.seeds, r.test_acc)),
                                     dict(zip(recipe.seeds, recipe.test_acc)), "the recipe")
                             if recipe is not None and r is not recipe else None)
                search_epochs = runs[r.arm]["epochs"] if r.arm in runs else (
                    runs["heads"]["control_epochs"] if r.arm == "control" else None)
                print(found.add(seed, r.label, FOUND_BY[r.arm], search_epochs, {"mean": r.mean, "sd": r.sd or 0.0},
                                " ".join(f"{a:.3f}" for a in r.test_acc),
                                None if c is None or c.low is None else c.model_dump(),
                                None if vs_recipe is None or vs_recipe.low is None else vs_recipe.model_dump()))
        tables.append(found)
    epochs = len(ranks_rows[0][1][0])
    ranks = Table("Spearman's rho of val acc after k epochs with the final val acc, random search's trials",
                  "seed", *(Column(f"k={k}", "{:+.2f}") for k in range(1, epochs)))
    print(f"\n# {ranks.title}\n{ranks.header()}")
    for seed, curves in ranks_rows:
        final = [c[-1] for c in curves]
        print(ranks.add(seed, *(float(spearmanr([c[k - 1] for c in curves], final)[0]) for k in range(1, epochs))))
    tables.append(ranks)
    write_json(__file__, args, tables)


if __name__ == "__main__":
    main()

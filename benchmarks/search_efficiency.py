"""TPE + Hyperband vs. random search without pruning, on a shipped space (offline digits by default).

    python benchmarks/search_efficiency.py [--space spaces/lambda_decay.yaml] [--trials 12] [--set key=value ...]

Both searches run the same number of trials in fresh SQLite studies, with different sampler seeds
(random: ``seed``, TPE: ``seed + 1000``), so TPE's random start-up trials are not random search's own. The table gives each one's best
value, the training epochs it spent in all, trials per minute (end to end, this process), and the
epochs TPE + Hyperband needed to first reach random search's best value, as a fraction of random
search's epochs. A second table says how well a trial's accuracy after k epochs ranks the random
search's trials by their final accuracy (Spearman's rho): a pruner deciding before that is informative
stops trials at random (see ``study.min_epochs``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState
from record import Column, Table, add_json_flag, write_json
from scipy.stats import spearmanr

from search.optuna_backend import run
from search.space import load_space
from search.storage import open_storage


def search(space_path: str, overrides: list[str], sampler: str, pruner: str, trials: int, seed: int) -> dict:
    space = load_space(space_path, overrides)
    space.study.sampler, space.study.pruner, space.study.seed, space.study.n_trials = sampler, pruner, seed, trials
    space.study.baseline = False  # the same fixed cost for both searches: left out of the comparison
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'study.db'}"
        t0 = time.perf_counter()
        study = run(space, open_storage(url, space.study.heartbeat), url, None)
        seconds = time.perf_counter() - t0
        done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
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
            "val_acc_curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="spaces/lambda_decay.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_json_flag(parser)
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rand = search(args.space, args.overrides, "random", "none", args.trials, seed)
        tpe = search(args.space, args.overrides, "tpe", "hyperband", args.trials, seed + 1000)
        reach = next((e for e, b in tpe["curve"] if b >= rand["best"]), None)
        rows.append((seed, rand, tpe, reach))
    searches = Table(f"{args.space}, {args.trials} trials each, val_acc "
                     "(a pruned trial counts the value it ended on)",
                     "seed", "search", Column("best val acc", "{:.3f}"), "epochs spent",
                     Column("trials/min", "{:.1f}"), Column("wall s", "{:.0f}"),
                     Column("epochs to reach random's best", "{0[epochs]} of {0[of]} = {0[fraction]:.0%}",
                            none="not reached"))
    print(f"\n# {searches.title}\n{searches.header()}")
    for seed, rand, tpe, reach in rows:
        for name, r in (("random, no pruning", rand), ("TPE + Hyperband", tpe)):
            # random search's row has no such cell: its best is what is to be reached
            to_reach = [] if r is rand else [None if reach is None else {
                "epochs": reach, "of": rand["epochs"], "fraction": reach / rand["epochs"]}]
            print(searches.add(seed, name, r["best"], r["epochs"], r["per_min"], r["seconds"], *to_reach))
    epochs = len(rows[0][1]["val_acc_curves"][0])
    ranks = Table("Spearman's rho of val acc after k epochs with the final val acc, random search's trials",
                  "seed", *(Column(f"k={k}", "{:+.2f}") for k in range(1, epochs)))
    print(f"\n# {ranks.title}\n{ranks.header()}")
    for seed, rand, _, _ in rows:
        curves = rand["val_acc_curves"]
        final = [c[-1] for c in curves]
        rhos = [float(spearmanr([c[k - 1] for c in curves], final)[0]) for k in range(1, epochs)]
        print(ranks.add(seed, *rhos))
    write_json(__file__, args, [searches, ranks])


if __name__ == "__main__":
    main()

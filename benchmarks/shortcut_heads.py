"""Shortcut heads vs. no heads on the offline default (digits), same net, same epochs, several seeds.

    python benchmarks/shortcut_heads.py [--config configs/digits.yaml] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/shortcut_heads.py --flow [--archs resnet20 resnet34]

Prints validation accuracy per seed for both runs, their means and the ratio, then the per-layer
mean |grad| of the first epoch (where vanishing gradients hurt most) for both, and their ratio.
The heads run is the config as given; the baseline is the same config with ``heads.exits=[]``.

``--flow`` answers the paper's question instead: for each architecture and for a surrogate whose
gradient vanishes away from the threshold (atan, alpha 1) and the default rectangle, one first epoch
with and without heads, and per LIF layer the mean |dL/dx| at its input (the surrogate gradient that
reaches that depth), the ratio, and the heads' share of it; then the cost of the diagnostics per
training step (``run.grad_stats`` on vs. off, paired rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

from record import Column, Table, add_json_flag, write_json

from trainer.config import load
from trainer.fit import FitResult, fit


def run(config: str | None, overrides: list[str], seed: int, heads: bool) -> tuple[FitResult, float]:
    extra = [f"run.seed={seed}"] + ([] if heads else ["heads.exits=[]"])
    t0 = time.perf_counter()
    result = fit(load(config, overrides + extra))
    return result, time.perf_counter() - t0


SURROGATES = {"atan, alpha 1": ["neuron.surrogate=atan", "neuron.alpha=1.0"],
              "rectangle, alpha 1": ["neuron.surrogate=rectangle", "neuron.alpha=1.0"]}
ARCH = {"resnet20": ["model.arch=resnet20"],  # a deep net at a width a CPU trains in seconds per epoch
        "resnet34": ["model.arch=resnet34", "model.width=16", "model.stem=cifar"]}


def flow(config: str, overrides: list[str], archs: list[str], rounds: int) -> list[Table]:
    tables = []
    for arch in archs:
        for surrogate, neuron in SURROGATES.items():
            first = overrides + ARCH[arch] + neuron
            stop = lambda report: True  # noqa: E731 - the first epoch of the configured schedule is enough
            plain = fit(load(config, first + ["heads.exits=[]"]), stop, test=False).history[0]
            heads = fit(load(config, first), stop, test=False).history[0]
            split = heads.flow_split
            table = Table(f"{arch}, {surrogate}: mean |dL/dx| at each LIF input, first epoch (lambda "
                          f"{heads.metrics['lambda']:.2f}); val acc {plain.metrics['val_acc']:.3f} plain, "
                          f"{heads.metrics['val_acc']:.3f} heads",
                          "LIF layer", Column("no heads", "{:.2e}"), Column("with heads", "{:.2e}"),
                          Column("ratio", "{:.2f}"), Column("heads' share", "{:.2f}"))
            tables.append(table)
            print(f"\n{table.title}\n{table.header()}")
            for layer, stats in plain.grad_flow.items():
                with_heads = heads.grad_flow[layer]["mean"]
                h = split.get("heads", {}).get(layer, {}).get("mean", 0.0)
                m = split.get("main", {}).get(layer, {}).get("mean", 0.0)
                print(table.add(layer, stats["mean"], with_heads, with_heads / stats["mean"],
                                h / (h + m) if h + m else 0.0), flush=True)

    cost = Table("cost of the diagnostics per epoch (run.grad_stats off vs. on, medians of paired rounds)",
                 "diagnostics (grad stats + gradient flow)", Column("s per epoch, off", "{:.2f}"),
                 Column("on", "{:.2f}"), Column("on / off", "{:.3f}"))
    tables.append(cost)
    print(f"\n{cost.header()}")
    for arch in archs:
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):  # paired, alternating order: drift of the machine's speed cancels
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                cfg = load(config, overrides + ARCH[arch] + [f"run.grad_stats={str(on).lower()}"])
                second = fit(cfg, lambda report: report.epoch == 1, test=False).history[1]  # no split steps
                times[on].append(second.metrics["epoch_time"])
        ratios = statistics.median(b / a for a, b in zip(times[False], times[True]))
        print(cost.add(arch, *(statistics.median(times[on]) for on in (False, True)), ratios), flush=True)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--flow", action="store_true", help="gradient flow per LIF layer (see above)")
    parser.add_argument("--archs", nargs="+", default=list(ARCH), choices=list(ARCH))
    parser.add_argument("--rounds", type=int, default=3, help="--flow: paired rounds of the diagnostics' cost")
    add_json_flag(parser)
    args = parser.parse_args()
    if args.flow:  # its own default file: a --flow run does not overwrite the comparison's tables
        tables = flow(args.config, args.overrides, args.archs, args.rounds)
        write_json(__file__, args, tables, "shortcut_heads_flow")
        return
    cfg = load(args.config, args.overrides)
    lam = cfg.lambda_
    runs = Table(f"{cfg.model.arch} on {cfg.data.name}, T={cfg.data.timesteps}, {cfg.optim.epochs} epochs, "
                 f"heads at {cfg.heads.exits}, lambda {lam.schedule} {lam.start}->{lam.end}",
                 "run", Column("final val acc (mean ± sd)", "{0[mean]:.3f} ± {0[sd]:.3f}"),
                 Column("best val acc", "{:.3f}"), Column("test acc", "{:.3f}"), Column("s/run", "{:.0f}"))
    print(f"# {runs.title}")

    rows, first_grads = [], {}
    for seed in args.seeds:
        for heads in (False, True):
            result, seconds = run(args.config, args.overrides, seed, heads)
            final = result.history[-1].metrics["val_acc"]
            rows.append((seed, heads, final, result.best_val_acc, result.test["test_acc"], seconds))
            print(f"seed {seed} {'heads' if heads else 'plain'}: final val {final:.3f}, "
                  f"best val {result.best_val_acc:.3f}, test {result.test['test_acc']:.3f} ({seconds:.0f} s)",
                  flush=True)
            first_grads.setdefault(heads, []).append(result.history[0].grad_stats)

    print(f"\n{runs.header()}")
    means = {}
    for heads in (False, True):
        sel = [r for r in rows if r[1] == heads]
        col = lambda i: [r[i] for r in sel]  # noqa: E731
        means[heads] = statistics.mean(col(2))
        sd = statistics.stdev(col(2)) if len(sel) > 1 else 0.0
        print(runs.add("heads + lambda" if heads else "no heads", {"mean": means[heads], "sd": sd},
                       *(statistics.mean(col(i)) for i in (3, 4, 5))))
    print(f"\nheads / no heads, final val acc: {means[True] / means[False]:.2f}x")

    grads = Table("mean |grad| per layer in the first epoch, mean over seeds", "layer",
                  Column("mean abs grad, no heads", "{:.2e}"), Column("with heads", "{:.2e}"),
                  Column("ratio", "{:.2f}"))
    print(f"\n{grads.header()}")
    layers = list(first_grads[False][0])
    for layer in layers:
        plain = statistics.mean(g[layer]["mean"] for g in first_grads[False])
        with_heads = statistics.mean(g[layer]["mean"] for g in first_grads[True])
        ratio = with_heads / plain if plain else float("inf")
        print(grads.add(layer, plain, with_heads, ratio))
    write_json(__file__, args, [runs, grads])


if __name__ == "__main__":
    main()

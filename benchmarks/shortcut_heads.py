"""Shortcut heads vs. no heads on the offline default (digits), same net, same epochs, several seeds.

    python benchmarks/shortcut_heads.py [--config configs/digits.yaml] [--seeds 0 1 2] [--set key=value ...]

Prints validation accuracy per seed for both runs, their means and the ratio, then the per-layer
mean |grad| of the first epoch (where vanishing gradients hurt most) for both, and their ratio.
The heads run is the config as given; the baseline is the same config with ``heads.exits=[]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from trainer.config import load
from trainer.fit import FitResult, fit


def run(config: str | None, overrides: list[str], seed: int, heads: bool) -> tuple[FitResult, float]:
    extra = [f"run.seed={seed}"] + ([] if heads else ["heads.exits=[]"])
    t0 = time.perf_counter()
    result = fit(load(config, overrides + extra))
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load(args.config, args.overrides)
    print(f"# {cfg.model.arch} on {cfg.data.name}, T={cfg.data.timesteps}, {cfg.optim.epochs} epochs, "
          f"heads at {cfg.heads.exits}, lambda {cfg.lambda_.schedule} {cfg.lambda_.start}->{cfg.lambda_.end}")

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

    print("\n| run | final val acc (mean ± sd) | best val acc | test acc | s/run |")
    print("|---|---|---|---|---|")
    means = {}
    for heads in (False, True):
        sel = [r for r in rows if r[1] == heads]
        col = lambda i: [r[i] for r in sel]  # noqa: E731
        means[heads] = statistics.mean(col(2))
        sd = statistics.stdev(col(2)) if len(sel) > 1 else 0.0
        print(f"| {'heads + lambda' if heads else 'no heads'} | {means[heads]:.3f} ± {sd:.3f} | "
              f"{statistics.mean(col(3)):.3f} | {statistics.mean(col(4)):.3f} | {statistics.mean(col(5)):.0f} |")
    print(f"\nheads / no heads, final val acc: {means[True] / means[False]:.2f}x")

    print("\n| layer | mean abs grad, no heads | with heads | ratio |")
    print("|---|---|---|---|")
    layers = list(first_grads[False][0])
    for layer in layers:
        plain = statistics.mean(g[layer]["mean"] for g in first_grads[False])
        with_heads = statistics.mean(g[layer]["mean"] for g in first_grads[True])
        ratio = with_heads / plain if plain else float("inf")
        print(f"| {layer} | {plain:.2e} | {with_heads:.2e} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

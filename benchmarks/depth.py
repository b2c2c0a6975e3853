"""The paper's depth table at CPU scale: does the gain of shortcut heads grow with depth?

    python benchmarks/depth.py [--archs resnet18 resnet34 resnet50 resnet101 resnet152 vgg16] [--seeds 0 1 2]
                               [--width 8] [--epochs 12] [--limit 512] [--set KEY=VALUE]

Guo et al. (NeurIPS 2024) report on CIFAR-100 that the heads' gain grows with depth (ResNet-18 72.2 ->
74.8, ResNet-152 42.5 -> 75.5). Here each architecture trains on digits (configs/digits.yaml: AdamW,
rectangle surrogate, T=4) with the CIFAR stem at ``--width`` first-stage channels, ``--epochs`` epochs and
``--limit`` training images, with heads at its default exits (the end of every stage but the last) and
lambda as the config sets it, and without heads, for each seed: the final validation accuracy (mean and
sd over seeds) and the mean |grad| of the first layer's weight in the first epoch, with and without.
The defaults take about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

from record import Column, Table, add_json_flag, write_json

from trainer.config import load
from trainer.fit import fit

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16"]


def depth(arch: str) -> int:
    """The depth in the architecture's name (our VGG-16 has its 13 convolutions and one linear classifier)."""
    return int(arch.lstrip("resnetvg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--limit", type=int, default=512, help="images per split (digits has 1150 for training)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_json_flag(parser)
    args = parser.parse_args()
    common = args.overrides + [f"model.width={args.width}", f"optim.epochs={args.epochs}",
                               f"data.limit={args.limit}"]
    cfg = load(args.config, common)
    runs = Table(f"{cfg.data.name}, T={cfg.data.timesteps}, width {args.width}, {args.epochs} epochs, "
                 f"{args.limit} images per split, {cfg.optim.name} lr {cfg.optim.lr}, heads at the default exits, "
                 f"lambda {cfg.lambda_.schedule} {cfg.lambda_.start}->{cfg.lambda_.end}; seeds {args.seeds}",
                 "arch", "heads", Column("final val acc (mean ± sd)", "{0[mean]:.3f} ± {0[sd]:.3f}"),
                 Column("per seed", "{}"), Column("first layer |grad|, epoch 1", "{:.2e}"),
                 Column("s/run", "{:.0f}"))
    gaps = Table("the heads' gain per depth (final val acc, heads minus none, mean over seeds)", "arch",
                 Column("depth", "{}"), Column("no heads", "{:.3f}"), Column("heads", "{:.3f}"),
                 Column("gain", "{:+.3f}"), Column("first layer |grad| heads / none", "{:.2f}"))
    print(f"# {runs.title}\n{runs.header()}", flush=True)
    means: dict[tuple[str, bool], tuple[float, float]] = {}
    for arch in args.archs:
        for heads in (False, True):
            finals, grads, seconds = [], [], []
            for seed in args.seeds:
                stem = ["model.stem=cifar"] if arch.startswith("resnet") else []
                exits = "heads.exits=[default]" if heads else "heads.exits=[]"
                run = load(args.config, common + [f"model.arch={arch}", *stem, exits, f"run.seed={seed}"])
                t0 = time.perf_counter()
                result = fit(run, test=False)
                seconds.append(time.perf_counter() - t0)
                finals.append(result.history[-1].metrics["val_acc"])
                first_layer = next(iter(result.history[0].grad_stats.values()))
                grads.append(first_layer["mean"])
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            means[arch, heads] = statistics.mean(finals), statistics.mean(grads)
            print(runs.add(arch, "yes" if heads else "no", {"mean": means[arch, heads][0], "sd": sd},
                           " ".join(f"{f:.3f}" for f in finals), means[arch, heads][1],
                           statistics.mean(seconds)), flush=True)
    print(f"\n{gaps.header()}")
    for arch in args.archs:
        (plain, g0), (with_heads, g1) = means[arch, False], means[arch, True]
        print(gaps.add(arch, depth(arch), plain, with_heads, with_heads - plain, g1 / g0 if g0 else None))
    write_json(__file__, args, [runs, gaps])


if __name__ == "__main__":
    main()

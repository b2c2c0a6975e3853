"""The paper's depth table at CPU scale, per surrogate: does the gain of shortcut heads grow with depth, and
what sets whether a deep SNN trains at all?

    python benchmarks/depth.py [--surrogates rectangle triangle atan] [--archs resnet20 resnet18 resnet34 resnet50
                               resnet101 resnet152] [--zoo spiking_resnet34 sew_resnet34] [--seeds 0 1 2]
                               [--width 8] [--epochs 12] [--limit 512] [--jobs 2] [--set KEY=VALUE]

Guo et al. (NeurIPS 2024) report on CIFAR-100 that the heads' gain grows with depth (ResNet-34 69.98 ->
75.67, ResNet-152 42.53 -> 75.49, without -> with heads). Here each architecture trains on digits
(configs/digits.yaml: AdamW lr 0.005, T=4, cosine lambda 0.9 -> 0) with the CIFAR stem at ``--width``
first-stage channels, ``--epochs`` epochs and ``--limit`` training images, with heads at its default exits
(the end of every stage but the last) and without, for each seed and surrogate (each at alpha 1). Per
surrogate and depth the table gives the final validation accuracy (mean ± sd over seeds) with and without
heads, the heads' gain, and the gradient at initialisation (``trainer.gradients``): the mean E[sg^2] over
the LIF layers and the first spiking layer's |dL/dx| over the last one's. ``--zoo`` adds SpikingJelly's
models through ``trainer.zoo:spikingjelly`` with the adapter's neuron (LIFNode, ATan of alpha 2, detached
reset) and their own widths (a SEW-ResNet with its ADD connection), heads at the ends of ``layer1``-``layer3``. ``--jobs`` runs that many trainings
at once, one thread each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from record import Column, Table, add_json_flag, write_json

ARCHS = ["resnet20", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
ZOO_EXITS = "heads.exits=[layer1,layer2,layer3]"  # SpikingJelly's ResNets: the ends of all stages but the last


def depth(arch: str) -> int:
    """The depth in the architecture's name (SpikingJelly's ``spiking_resnet34``, ``sew_resnet34`` too)."""
    return int(arch.rsplit("resnet", 1)[1])


def overrides(arch: str, surrogate: str | None, args: argparse.Namespace) -> list[str]:
    common = [*args.overrides, f"optim.epochs={args.epochs}", f"data.limit={args.limit}"]
    if surrogate is None:  # SpikingJelly's zoo, its own neuron; a SEW-ResNet adds its shortcut (cnf: ADD)
        cnf = ", cnf: ADD" if arch.startswith("sew_") else ""
        return [*common, "model.arch=trainer.zoo:spikingjelly", f"model.kwargs={{model: {arch}{cnf}}}"]
    return [*common, f"model.arch={arch}", "model.stem=cifar", f"model.width={args.width}",
            f"neuron.surrogate={surrogate}", "neuron.alpha=1.0"]


def train(config: str, items: list[str]) -> tuple[float, float]:
    """One training, in a worker process of its own with one thread: (final val acc, seconds)."""
    import torch

    from trainer.config import load
    from trainer.fit import fit

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = fit(load(config, items), test=False)
    return result.history[-1].metrics["val_acc"], time.perf_counter() - t0


def initial(config: str, items: list[str]) -> tuple[float, float | None]:
    """(first/last |dL/dx| at initialisation without heads, mean E[sg^2] over the LIFs it can read)."""
    import torch

    from trainer.config import load
    from trainer.gradients import profile

    torch.set_num_threads(1)
    found = profile(load(config, items))
    return found.ratio, statistics.mean(found.gain.values()) if found.gain else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--surrogates", nargs="+", default=["rectangle", "triangle", "atan"])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--zoo", nargs="*", default=["spiking_resnet34", "sew_resnet34"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--limit", type=int, default=512, help="images per split (digits has 1150 for training)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, one thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_json_flag(parser)
    args = parser.parse_args()
    rows = [(s, a) for s in args.surrogates for a in args.archs] + [(None, z) for z in args.zoo]
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers' libraries, before they start
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        profiles = {row: pool.submit(initial, args.config, [*overrides(row[1], row[0], args), "heads.exits=[]"])
                    for row in rows}
        runs = {(row, heads, seed): pool.submit(train, args.config, [
                    *overrides(row[1], row[0], args), f"run.seed={seed}",
                    (ZOO_EXITS if row[0] is None else "heads.exits=[default]") if heads else "heads.exits=[]"])
                for row in rows for heads in (False, True) for seed in args.seeds}
        profiles = {row: f.result() for row, f in profiles.items()}
        runs = {key: f.result() for key, f in runs.items()}
    minutes = (time.perf_counter() - started) / 60
    title = (f"digits, T=4, {args.epochs} epochs, {args.limit} images per split, AdamW lr 0.005, cosine lambda "
             f"0.9 -> 0, heads at the default exits; width {args.width} (SpikingJelly: its own); seeds {args.seeds}; "
             f"{minutes:.0f} minutes with {args.jobs} jobs")
    table = Table(title, "surrogate", "arch", Column("depth", "{}"), Column("E[sg^2] at init", "{:.3f}", none="n/a"),
                  Column("first/last |dL/dx| at init", "{:.2g}"),
                  Column("no heads (mean ± sd)", "{0[mean]:.3f} ± {0[sd]:.3f}"),
                  Column("heads (mean ± sd)", "{0[mean]:.3f} ± {0[sd]:.3f}"), Column("gain", "{:+.3f}"),
                  Column("per seed, no heads / heads", "{}"), Column("s/run", "{:.0f}"))
    print(f"# {title}\n{table.header()}", flush=True)
    for row in rows:
        surrogate, arch = row
        accs = {heads: [runs[row, heads, s][0] for s in args.seeds] for heads in (False, True)}
        stats = {h: {"mean": statistics.mean(a), "sd": statistics.stdev(a) if len(a) > 1 else 0.0}
                 for h, a in accs.items()}
        seconds = statistics.mean(runs[row, h, s][1] for h in (False, True) for s in args.seeds)
        ratio, gain = profiles[row]
        print(table.add(surrogate or "SpikingJelly's (ATan 2)", arch, depth(arch), gain, ratio, stats[False],
                        stats[True], stats[True]["mean"] - stats[False]["mean"],
                        " ".join(f"{a:.2f}" for a in accs[False]) + " / " + " ".join(f"{a:.2f}" for a in accs[True]),
                        seconds), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()

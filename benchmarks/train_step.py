"""One training step, eager vs. compiled (``model.compile``), with and without shortcut heads, per architecture.

    python benchmarks/train_step.py [--config configs/digits.yaml] [--archs resnet20 resnet18] [--batch 32]
                                    [--timesteps 4] [--size 8] [--steps 20] [--rounds 5] [--device auto]
                                    [--compile-backend inductor] [--set KEY=VALUE]

A step is ``trainer.fit.step_loss`` (forward, shortcut loss) plus backward and an AdamW update, on random
images of ``--size`` pixels (8: the digits default), for the config's net without heads and with its heads
(its exits that the arch has, its head design). The first compiled call's time is the compilation (warm or
cold: it depends on inductor's cache, TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_<user>). Eager and
compiled steps then take turns for ``--rounds`` rounds of ``--steps`` steps, so drift in machine speed cancels
out: each time is the median over rounds of a round's median step, and compiled / eager the median over rounds
of the two within one round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from record import Column, Table, add_json_flag, write_json

from trainer.config import load
from trainer.fit import inductor_options, resolve_device, step_loss
from trainer.heads import ShortcutNet
from trainer.data import Shape
from trainer.taps import run_probe


def timed_steps(fn, net: ShortcutNet, x: torch.Tensor, y: torch.Tensor, heads: bool, steps: int,
                device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` training steps."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    lam = torch.tensor(0.5, device=device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        fn(net, x, y, lam, heads)[1].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--archs", nargs="+", default=["resnet20"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--width", type=int, help="first-stage channels (default: the arch's)")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="eager and compiled take turns, a round each")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (the tests take aot_eager: the same trace, no code generation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the config, e.g. --set heads.hidden=0 (the spaces' pool + linear heads)")
    add_json_flag(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    options = inductor_options(device.type) if args.compile_backend == "inductor" else None
    compiled = torch.compile(step_loss, dynamic=False, backend=args.compile_backend, options=options)  # as fit's
    table = Table(f"batch {args.batch}, T={args.timesteps}, {args.size}x{args.size} inputs, {device}",
                  "arch", "heads", Column("eager ms/step", "{:.1f}"), Column("compiled ms/step", "{:.1f}"),
                  Column("compiled / eager", "{:.2f}"), Column("first compiled step, s", "{:.0f}"))
    print(f"# {table.title}\n{table.header()}")
    for arch in args.archs:
        cfg = load(args.config, args.overrides + [f"model.arch={arch}", "neuron.compile=never", "heads.exits=[]"]
                   + ([f"model.width={args.width}"] if args.width else []))
        wanted = load(args.config, args.overrides).heads
        for heads in (False, True):
            torch.manual_seed(0)
            neuron = cfg.neuron.factory(cuda=False)
            backbone = cfg.model.build(10, 1, neuron)
            shape = Shape(1, (args.size, args.size), 10)
            has = run_probe(backbone, shape, arch).taps
            exits = [e for e in wanted.exits if e in has] if heads else []
            net = ShortcutNet.attach(backbone, exits, shape, neuron, wanted.hidden, arch).to(device)
            x = torch.rand(args.timesteps, args.batch, 1, args.size, args.size, device=device)
            y = torch.randint(0, 10, (args.batch,), device=device)
            (first,) = timed_steps(compiled, net, x, y, heads, 1, device)  # compiles
            rounds = [[statistics.median(timed_steps(fn, net, x, y, heads, args.steps, device)) * 1000
                       for fn in (step_loss, compiled)] for _ in range(args.rounds)]
            eager, fast = (statistics.median(r[i] for r in rounds) for i in (0, 1))
            ratio = statistics.median(c / e for e, c in rounds)
            print(table.add(arch, len(exits), eager, fast, ratio, first), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()

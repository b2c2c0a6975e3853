"""Training-step time with shortcut heads vs. without, per spiking ResNet.

    python benchmarks/heads_overhead.py [--device cpu|cuda] [--archs resnet20 resnet19 ...] [--batch 64]

Heads sit at the end of every stage but the last (pool + linear, the paper's cheap head; and the
1x1-conv head with ``--hidden 32``). Inputs are random images of the arch's usual size (8x8 digits for
``resnet20`` on CPU, 32x32 CIFAR otherwise, 64x64 for ImageNet-style nets to keep memory small), T=4.
Plain and heads runs take turns for ``--rounds`` rounds, each going first in every other round; the
overhead is the median over rounds of with-heads time / plain time within the round, so drift in
machine speed, which is slower than a round, cancels out. The step times shown are medians over
rounds. The op columns count the ATen ops one training step runs (views excluded; on a GPU each is
about one kernel launch, which is what small steps are bound by). The last column estimates one
CIFAR-10 training epoch (40,000 images) from the plain step time.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from record import Column, Table, add_json_flag, write_json
from timing import time_ms

from trainer.compat import TorchDispatchMode
from trainer.config import NeuronConfig
from trainer.data import Shape
from trainer.heads import ShortcutNet
from trainer.models import ARCHS
from trainer.schedule import shortcut_loss


def make_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            main, heads = net(x)
            loss = shortcut_loss(main, heads, y, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class OpCount(TorchDispatchMode):
    """Counts the ATen ops that run (views excluded): on a GPU, roughly one kernel launch each."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_per_step(step: Callable[[], None]) -> int:
    step()
    with OpCount() as count:
        step()
    return count.n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet20", "resnet19", "resnet18", "resnet34"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="rounds in which plain and heads runs take turns")
    add_json_flag(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    neuron = NeuronConfig().factory(cuda)
    table = Table(f"device {device}, batch {args.batch}, T={args.timesteps}, head hidden={args.hidden}, "
                  f"{'bf16 autocast, channels_last, compiled LIF' if cuda else 'fp32, eager LIF'}",
                  "arch", Column("input", "{0}x{0}"), "heads at", Column("ms/step plain", "{:.1f}"),
                  Column("ms/step heads", "{:.1f}"), Column("overhead", "{:+.1%}"), "ops/step plain",
                  Column("heads' ops", "+{}"), Column("CIFAR-10 epoch (plain)", "{:.0f} s"))
    print(f"# {table.title}\n{table.header()}")
    for arch in args.archs:
        size = 8 if arch == "resnet20" and not cuda else (64 if ARCHS[arch].stem == "imagenet" else 32)
        channels = 1 if size == 8 else 3
        torch.manual_seed(0)
        backbone = ARCHS[arch](10, channels, neuron)
        shape = Shape(channels, (size, size), 10)
        x = torch.rand(args.timesteps, args.batch, channels, size, size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        nets = [ShortcutNet.attach(backbone, exits, shape, neuron, args.hidden, arch).to(device)
                for exits in ([], ARCHS[arch].default_exits)]
        if cuda:
            nets = [net.to(memory_format=torch.channels_last) for net in nets]
        steps = [make_step(net, x, y, amp=cuda) for net in nets]
        ops = [ops_per_step(step) for step in steps]
        rounds = []
        for i in range(args.rounds):  # who goes first alternates too
            ms = {j: time_ms(steps[j], args.repeats, cuda)[0] for j in ((0, 1) if i % 2 == 0 else (1, 0))}
            rounds.append((ms[0], ms[1]))
        times = [statistics.median(r[i] for r in rounds) for i in range(2)]
        overhead = statistics.median(heads / plain for plain, heads in rounds) - 1
        epoch_s = times[0] / 1000 * 40_000 / args.batch
        print(table.add(arch, size, ", ".join(ARCHS[arch].default_exits), *times, overhead, ops[0], ops[1] - ops[0],
                        epoch_s), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()

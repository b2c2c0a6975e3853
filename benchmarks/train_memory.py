"""Peak memory of training steps at T = 2, 4, 8 (and the ratio to T=2, measured in the same run).

    python benchmarks/train_memory.py [--device cpu|cuda] [--arch resnet20] [--size 8] [--batch 64]

Each T runs in a fresh subprocess on CPU (peak resident set size, which includes the ~0.5 GB of
torch itself) or after ``torch.cuda.reset_peak_memory_stats`` on CUDA (peak allocated tensors).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from record import Column, Table, add_json_flag, write_json


def measure(arch: str, size: int, batch: int, timesteps: int, device: str) -> dict:
    from trainer.config import NeuronConfig
    from trainer.heads import ShortcutNet
    from trainer.data import Shape
    from trainer.models import ARCHS
    from trainer.schedule import shortcut_loss

    dev = torch.device(device)
    channels = 1 if size == 8 else 3
    neuron = NeuronConfig().factory(dev.type == "cuda")
    backbone = ARCHS[arch](10, channels, neuron)
    shape = Shape(channels, (size, size), 10)
    net = ShortcutNet.attach(backbone, ARCHS[arch].default_exits, shape, neuron, arch=arch).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(timesteps, batch, channels, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):
        main, heads = net(x)
        loss = shortcut_loss(main, heads, y, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"T": timesteps, "peak_mib": peak, "ms_per_step": (time.perf_counter() - t0) / 3 * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--size", type=int, default=8, help="input side (8 = digits, 32 = CIFAR)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one T and print JSON
    add_json_flag(parser)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.arch, args.size, args.batch, args.one, args.device)))
        return
    table = Table(f"{args.arch}, {args.size}x{args.size}, batch {args.batch}, heads at stage ends, "
                  f"device {args.device}",
                  "T", Column("peak memory (MiB)", "{:.0f}"), Column("vs T=2", "{:.2f}x"),
                  Column("ms/step (incl. warm-up)", "{:.0f}"))
    print(f"# {table.title}\n{table.header()}")
    base = None
    for t in (2, 4, 8):
        out = subprocess.run([sys.executable, __file__, "--one", str(t), "--arch", args.arch, "--size", str(args.size),
                              "--batch", str(args.batch), "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        base = base or row["peak_mib"]
        print(table.add(t, row["peak_mib"], row["peak_mib"] / base, row["ms_per_step"]), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()

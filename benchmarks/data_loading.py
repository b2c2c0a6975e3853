"""Training-batch throughput: CIFAR held on the device with batched augmentation vs. torchvision's DataLoader.

    python benchmarks/data_loading.py [--images 10000] [--batch 128] [--rounds 3] [--device auto]

Writes CIFAR-10 files in the real format (python pickles, random pixels) to a temporary folder, then
reads one training epoch per round both ways with the same augmentation (random crop with padding 4,
horizontal flip, cutout 16): ours (``trainer.data``: uint8 tensors on the device, crop/flip/cutout on
whole batches) and torchvision's CIFAR10 dataset with ``RandomCrop``, ``RandomHorizontalFlip``,
``ToTensor`` and ``RandomErasing`` (the in-image variant of cutout) in a DataLoader with 0 and 2
workers, each batch moved to the device. Prints images per second (medians) and ratios of the paired
rounds against the DataLoader with 0 workers.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from record import Column, Table, add_json_flag, write_json
from torch.utils.data import DataLoader

from trainer.config import DataConfig
from trainer.data import load_data
from trainer.fit import resolve_device


def write_cifar(root: Path, images: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per = images // 5
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, per))}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                                                      "labels": [0] * 10}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def epoch(batches, device: torch.device) -> int:
    n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    add_json_flag(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)

    from torchvision import datasets, transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), args.images)
        # files written here cannot match the md5 sums of the official ones: check presence only
        from torchvision.datasets import cifar

        cifar.check_integrity = lambda path, md5=None: Path(path).is_file()
        ours = load_data(DataConfig(name="cifar10", root=tmp, batch_size=args.batch, val_fraction=0, cutout=16),
                         device)
        aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                         T.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0)])
        theirs = datasets.CIFAR10(tmp, train=True, transform=aug)
        runs = {"ours (on device, batched)": lambda e: (ours.start_epoch(e), ours.train)[1]}
        for workers in (0, 2):
            loader = DataLoader(theirs, batch_size=args.batch, shuffle=True, num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=workers > 0)
            runs[f"torchvision DataLoader, {workers} workers"] = lambda e, loader=loader: loader
        for name, batches in runs.items():  # warm-up: workers start, kernels load
            epoch(batches(0), device)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                n = epoch(runs[name](r + 1), device)
                rates[name].append(n / (time.perf_counter() - t0))

    base = "torchvision DataLoader, 0 workers"
    table = Table(f"{args.images} CIFAR-10 images, batch {args.batch}, {device}, {args.rounds} rounds",
                  "loader", Column("images/s (median)", "{:,.0f}"),
                  Column("vs. DataLoader, 0 workers", "{:.1f}x"))
    print(f"# {table.title}\n{table.header()}")
    for name, values in rates.items():
        ratio = statistics.median(a / b for a, b in zip(values, rates[base]))
        print(table.add(name, statistics.median(values), ratio))
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()

"""Datasets and spike encoding.

- digits: scikit-learn's 8x8 digits (ships with scikit-learn: the offline default).
- mnist, cifar10, cifar100: torchvision, downloaded into ``root`` when ``download: true``.
- imagenet: torchvision's ImageNet (the archives must already be in ``root``; nothing downloads them).
- cifar10dvs: tonic's CIFAR10-DVS events, binned into ``timesteps`` frames by ``tonic.transforms.ToFrame``.

``val_fraction: 0`` gives no validation split: the final retraining trains on all the training data.
Small sets (digits, MNIST) are held in memory as tensors on the training device; the rest stream
through a DataLoader. Splits are fixed (generator seed 0) so every trial sees the same validation set;
the training order depends on (run seed, epoch) only (``DataBundle.start_epoch``).
Images are in [0, 1]: direct encoding repeats them over T, Poisson encoding samples Bernoulli spikes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.config import DataConfig

SPLIT_SEED = 0


class Batches(Sized, Protocol):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class DataBundle:
    train: Batches
    val: Batches | None  # None with val_fraction 0
    test: Batches
    num_classes: int
    in_channels: int
    shuffle: torch.Generator  # drives the training loader's order
    seed: int

    def __post_init__(self) -> None:
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Seed this epoch's shuffle from (seed, epoch) alone, so a resumed run sees the same batches."""
        self.shuffle.manual_seed(hash((self.seed, epoch)))


class TensorLoader:
    """Batches from tensors already in memory (no worker processes, no per-sample Python)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: torch.Generator | None = None) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.shuffle).to(self.x.device) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]


def split_indices(n: int, fractions: tuple[float, ...]) -> list[Tensor]:
    """Random disjoint index sets of the given fractions of ``n`` (the rest is the last set)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    out, start = [], 0
    for f in fractions:
        size = int(round(f * n))
        out.append(perm[start : start + size])
        start += size
    out.append(perm[start:])
    return out


def _limit(idx: Tensor, limit: int | None) -> Tensor:
    return idx if limit is None else idx[:limit]


def _tensor_bundle(
    cfg: DataConfig, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
    num_classes: int, device: torch.device, seed: int,
) -> DataBundle:
    val_idx, train_idx = split_indices(len(x_train), (cfg.val_fraction,))
    train_idx, val_idx = _limit(train_idx, cfg.limit), _limit(val_idx, cfg.limit)
    test_idx = _limit(torch.arange(len(x_test)), cfg.limit)
    to = lambda t: t.to(device)  # noqa: E731
    shuffle = torch.Generator()
    return DataBundle(
        train=TensorLoader(to(x_train[train_idx]), to(y_train[train_idx]), cfg.batch_size, shuffle),
        val=TensorLoader(to(x_train[val_idx]), to(y_train[val_idx]), cfg.batch_size) if len(val_idx) else None,
        test=TensorLoader(to(x_test[test_idx]), to(y_test[test_idx]), cfg.batch_size),
        num_classes=num_classes,
        in_channels=x_train.shape[1],
        shuffle=shuffle,
        seed=seed,
    )


def _digits(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    test_idx, train_idx = split_indices(len(x), (0.2,))
    return _tensor_bundle(cfg, x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, device, seed)


def _mnist(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from torchvision.datasets import MNIST

    train = MNIST(cfg.root, train=True, download=cfg.download)
    test = MNIST(cfg.root, train=False, download=cfg.download)
    prep = lambda d: d.data.unsqueeze(1).float() / 255.0  # noqa: E731
    return _tensor_bundle(cfg, prep(train), train.targets, prep(test), test.targets, 10, device, seed)


def _loader_bundle(
    cfg: DataConfig, splits: tuple[tuple[Dataset, Tensor], ...], num_classes: int, in_channels: int, seed: int
) -> DataBundle:
    """DataLoaders over (data set, indices) for train, val and test; only train shuffles, from the bundle's
    generator, so ``start_epoch`` makes the order reproducible."""
    shuffle = torch.Generator()

    def loader(ds: Dataset, idx: Tensor, train: bool) -> DataLoader | None:
        if not len(idx):
            return None
        return DataLoader(
            Subset(ds, _limit(idx, cfg.limit).tolist()),
            batch_size=cfg.batch_size,
            shuffle=train,
            num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=cfg.num_workers > 0,
            generator=shuffle if train else torch.Generator().manual_seed(seed),
        )

    train, val, test = (loader(ds, idx, i == 0) for i, (ds, idx) in enumerate(splits))
    return DataBundle(train, val, test, num_classes, in_channels, shuffle, seed)


def _official_test(
    cfg: DataConfig, train_aug: Dataset, train_plain: Dataset, test: Dataset, num_classes: int, seed: int
) -> DataBundle:
    """Train/val split of one training set (val without augmentation) plus the official test set."""
    val_idx, train_idx = split_indices(len(train_aug), (cfg.val_fraction,))  # type: ignore[arg-type]
    test_idx = torch.arange(len(test))  # type: ignore[arg-type]
    splits = ((train_aug, train_idx), (train_plain, val_idx), (test, test_idx))
    return _loader_bundle(cfg, splits, num_classes, 3, seed)


def _cifar(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision import datasets, transforms as T

    cls, classes = (datasets.CIFAR10, 10) if cfg.name == "cifar10" else (datasets.CIFAR100, 100)
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]
    if cfg.cutout:  # Cutout (DeVries & Taylor 2017) as torchvision's erasing of a square kept inside the image
        area = (min(cfg.cutout, 32) / 32) ** 2
        aug.append(T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    aug, plain = T.Compose(aug), T.ToTensor()
    train_aug = cls(cfg.root, train=True, transform=aug, download=cfg.download)
    train_plain = cls(cfg.root, train=True, transform=plain)
    test = cls(cfg.root, train=False, transform=plain, download=cfg.download)
    return _official_test(cfg, train_aug, train_plain, test, classes, seed)


def _imagenet(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision import datasets, transforms as T

    size = cfg.image_size
    aug = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    plain = T.Compose([T.Resize(int(size * 8 / 7)), T.CenterCrop(size), T.ToTensor()])
    train_aug = datasets.ImageNet(cfg.root, split="train", transform=aug)
    train_plain = datasets.ImageNet(cfg.root, split="train", transform=plain)
    test = datasets.ImageNet(cfg.root, split="val", transform=plain)
    return _official_test(cfg, train_aug, train_plain, test, len(test.classes), seed)


class _Frames:
    """Events -> float frames [T, 2, S, S] (picklable for DataLoader workers)."""

    def __init__(self, timesteps: int, size: int) -> None:
        import tonic

        self.to_frame = tonic.transforms.ToFrame(sensor_size=(128, 128, 2), n_time_bins=timesteps)
        self.size = size

    def __call__(self, events) -> Tensor:
        frames = torch.from_numpy(self.to_frame(events)).float()
        if self.size != frames.shape[-1]:
            frames = torch.nn.functional.interpolate(frames, size=(self.size, self.size), mode="area")
        return frames


def _cifar10dvs(cfg: DataConfig, seed: int) -> DataBundle:
    """CIFAR10-DVS has no official split: 10% test, then ``val_fraction`` of the rest for validation."""
    import tonic

    if not cfg.download and not os.path.isdir(os.path.join(cfg.root, "CIFAR10DVS")):
        raise FileNotFoundError(
            f"CIFAR10-DVS not found under {cfg.root}/CIFAR10DVS (set data.download=true to fetch it)"
        )
    size = min(cfg.image_size, 128)
    ds = tonic.datasets.CIFAR10DVS(cfg.root, transform=_Frames(cfg.timesteps, size))
    test_idx, rest = split_indices(len(ds), (0.1,))
    val_n = int(round(cfg.val_fraction * len(rest)))
    val_idx, train_idx = rest[:val_n], rest[val_n:]
    return _loader_bundle(cfg, ((ds, train_idx), (ds, val_idx), (ds, test_idx)), 10, 2, seed)


def load_data(cfg: DataConfig, device: torch.device, seed: int = 0) -> DataBundle:
    try:
        return _load(cfg, device, seed)
    except RuntimeError as err:  # torchvision's message names neither the folder nor our key
        if "Dataset not found" not in str(err):
            raise
        raise FileNotFoundError(f"{cfg.name} not found under {cfg.root} (set data.download=true to fetch it, "
                                f"or data.root to where it is)") from None


def _load(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    if cfg.name == "digits":
        return _digits(cfg, device, seed)
    if cfg.name == "mnist":
        return _mnist(cfg, device, seed)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg, seed)
    if cfg.name == "imagenet":
        return _imagenet(cfg, seed)
    return _cifar10dvs(cfg, seed)


def encode(x: Tensor, timesteps: int, encoding: str) -> Tensor:
    """Images [B, C, H, W] -> inputs [T, B, C, H, W]; event frames [B, T, C, H, W] are transposed."""
    if x.dim() == 5:
        return x.transpose(0, 1).contiguous()
    if encoding == "poisson":
        return (torch.rand((timesteps, *x.shape), device=x.device) < x).to(x.dtype)
    return x.unsqueeze(0).expand(timesteps, *x.shape)

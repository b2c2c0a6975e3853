"""Datasets and spike encoding.

- digits: scikit-learn's 8x8 digits (ships with scikit-learn: the offline default).
- mnist, cifar10, cifar100: torchvision's files (downloaded into ``root`` when ``download: true``), held
  as uint8 tensors on the training device; CIFAR's random crop, flip and cutout run there on whole
  batches (``Augment``): no worker processes, no per-image Python.
- imagenet: torchvision's ImageNet (the archives must already be in ``root``; nothing downloads them).
- cifar10dvs: tonic's CIFAR10-DVS events, binned into ``timesteps`` frames by ``tonic.transforms.ToFrame``
  once, cached as one tensor file under ``root``, then held on the training device.

``val_fraction: 0`` gives no validation split: the final retraining trains on all the training data.
ImageNet streams through a DataLoader. Splits are fixed (generator seed 0) so every
trial sees the same validation set; the training order and the augmentation draws depend on (run seed,
epoch) only (``DataBundle.start_epoch``), so a resumed run sees the batches of an unbroken one.
Images are in [0, 1]: direct encoding repeats them over T, Poisson encoding samples Bernoulli spikes.

``DATASETS`` maps the config's ``data.name`` to loaders, all called as ``loader(cfg, device, seed)``: adding a
data set is one ``@DATASETS.register("name")`` function returning a ``DataBundle``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.logs import logger
from trainer.registry import Registry
from trainer.seeds import derive

if TYPE_CHECKING:  # the config reads its data set names from DATASETS
    from trainer.config import DataConfig

SPLIT_SEED = 0


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set's files are not under ``data.root`` (and ``data.download`` is off)."""


class Batches(Sized, Protocol):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class DataBundle:
    train: Batches
    val: Batches | None  # None with val_fraction 0
    test: Batches
    num_classes: int
    in_channels: int
    shuffle: torch.Generator  # drives the training loader's order and augmentation draws
    seed: int
    workers: torch.Generator = field(default_factory=torch.Generator)  # DataLoader workers' base seed

    def __post_init__(self) -> None:
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Seed this epoch's draws from (seed, epoch) alone, so a resumed run sees the same batches."""
        self.shuffle.manual_seed(derive(self.seed, epoch))
        self.workers.manual_seed(derive(self.seed, epoch, 1))


class Shape(NamedTuple):
    """One sample's input (channels, height, width) and the number of classes, known without the files:
    a model is checked on a dry run of this shape before any data is read."""

    channels: int
    size: tuple[int, int]
    classes: int


Loader = Callable[["DataConfig", torch.device, int], DataBundle]  # (data config, training device, run seed)
DATASETS: Registry[Loader] = Registry("data set")  # each entry has ``shape(cfg) -> Shape``


def input_shape(cfg: DataConfig) -> Shape:
    return DATASETS[cfg.name].shape(cfg)  # type: ignore[attr-defined]


class Augment:
    """Random crop after zero padding, horizontal flip and optional Cutout (DeVries & Taylor 2017: a square
    of side ``cutout`` centred anywhere in the image, clipped at its borders), applied to whole uint8
    batches on their device. The draws are made per sample from one generator, for a whole epoch at once.
    The images are padded once (``prepare``); a crop is then one gather per batch."""

    def __init__(self, padding: int = 4, flip: bool = True, cutout: int = 0) -> None:
        self.padding, self.flip, self.cutout = padding, flip, cutout

    def draw(self, n: int, size: int, generator: torch.Generator) -> Tensor:
        """[n, 5] int64: crop offsets (top, left) in [0, 2 * padding], flip (0/1), cutout centre (y, x)."""
        span = 2 * self.padding + 1
        highs = (span, span, 2 if self.flip else 1, size, size)
        return torch.stack([torch.randint(h, (n,), generator=generator) for h in highs], 1)

    def prepare(self, x: Tensor) -> Tensor:
        """The images with their zero padding, as ``__call__`` takes them."""
        p = self.padding
        return F.pad(x, (p, p, p, p))

    def __call__(self, padded: Tensor, params: Tensor) -> Tensor:
        """Augmented images [b, c, h, w] from prepared (padded) ones."""
        p = self.padding
        b, c, h, w = padded.shape[0], padded.shape[1], padded.shape[2] - 2 * p, padded.shape[3] - 2 * p
        rows = params[:, 0, None] + torch.arange(h, device=padded.device)  # [b, h] rows of the padded image
        cols = params[:, 1, None] + torch.arange(w, device=padded.device)
        cols = torch.where(params[:, 2, None].bool(), cols.flip(1), cols)  # a flip reads the columns backwards
        index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).flatten(1)  # [b, h * w] into the padded plane
        out = padded.flatten(2).gather(2, index[:, None, :].expand(-1, c, -1)).view(b, c, h, w)
        if self.cutout:
            ys = torch.arange(h, device=out.device) - params[:, 3, None] + self.cutout // 2  # [b, h]
            xs = torch.arange(w, device=out.device) - params[:, 4, None] + self.cutout // 2
            inside = ((ys >= 0) & (ys < self.cutout))[:, :, None] & ((xs >= 0) & (xs < self.cutout))[:, None, :]
            out.masked_fill_(inside[:, None], 0)
        return out


class TensorLoader:
    """Batches from tensors already on the training device (no worker processes, no per-sample Python);
    uint8 images become floats in [0, 1] a batch at a time, after ``augment``."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: torch.Generator | None = None,
                 augment: Augment | None = None) -> None:
        self.x = augment.prepare(x) if augment else x
        self.y, self.batch_size, self.shuffle, self.augment = y, batch_size, shuffle, augment

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, device = len(self.x), self.x.device
        order = torch.randperm(n, generator=self.shuffle).to(device) if self.shuffle else torch.arange(n, device=device)
        size = self.x.shape[-1] - 2 * self.augment.padding if self.augment else 0
        params = self.augment.draw(n, size, self.shuffle).to(device) if self.augment else None
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = self.x.index_select(0, idx)  # on CPU many times faster than x[idx] for bytes
            if params is not None:
                x = self.augment(x, params[i : i + self.batch_size])
            yield (x.float().div_(255) if x.dtype == torch.uint8 else x), self.y.index_select(0, idx)


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
    num_classes: int, device: torch.device, seed: int, augment: Augment | None = None,
) -> DataBundle:
    val_idx, train_idx = split_indices(len(x_train), (cfg.val_fraction,))
    train_idx, val_idx = _limit(train_idx, cfg.limit), _limit(val_idx, cfg.limit)
    test_idx = _limit(torch.arange(len(x_test)), cfg.limit)
    to = lambda t: t.to(device)  # noqa: E731
    shuffle = torch.Generator()
    return DataBundle(
        train=TensorLoader(to(x_train[train_idx]), to(y_train[train_idx]), cfg.batch_size, shuffle, augment),
        val=TensorLoader(to(x_train[val_idx]), to(y_train[val_idx]), cfg.batch_size) if len(val_idx) else None,
        test=TensorLoader(to(x_test[test_idx]), to(y_test[test_idx]), cfg.batch_size),
        num_classes=num_classes,
        in_channels=x_train.shape[-3],  # [N, C, H, W], or [N, T, C, H, W] for event frames
        shuffle=shuffle,
        seed=seed,
    )


@DATASETS.register(shape=lambda cfg: Shape(1, (8, 8), 10))
def digits(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    images, target = _digits_arrays(Path(cfg.root) / "digits" / "digits.npz")
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    test_idx, train_idx = split_indices(len(x), (0.2,))
    return _tensor_bundle(cfg, x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, device, seed)


def _digits_arrays(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits (images [N, 8, 8] of 0-16, labels), kept in ``cache`` after the first load:
    importing scikit-learn costs each process ~1.7 s of CPU, more than an epoch of a digits trial. An
    unreadable file is read again from scikit-learn; a folder that cannot be written is left as it is."""
    try:
        with np.load(cache, allow_pickle=False) as saved:
            images, target = saved["images"], saved["target"]
        if images.shape == (1797, 8, 8) and target.shape == (1797,):
            return images, target
    except Exception:  # noqa: BLE001 - absent, truncated or another file: scikit-learn has the data
        pass
    from sklearn.datasets import load_digits

    raw = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, images=raw.images, target=raw.target)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, buffer.getbuffer())
    except OSError:
        pass
    return raw.images, raw.target


@DATASETS.register(shape=lambda cfg: Shape(1, (28, 28), 10))
def mnist(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from torchvision.datasets import MNIST

    train = MNIST(cfg.root, train=True, download=cfg.download)
    test = MNIST(cfg.root, train=False, download=cfg.download)
    prep = lambda d: d.data.unsqueeze(1)  # noqa: E731 - uint8 [N, 1, 28, 28]
    return _tensor_bundle(cfg, prep(train), train.targets, prep(test), test.targets, 10, device, seed)


def _workers(cfg: DataConfig) -> int:
    """DataLoader workers: ``num_workers``, or min(8, cores) when it is not set."""
    return min(8, os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers


def _loader_bundle(
    cfg: DataConfig, splits: tuple[tuple[Dataset, Tensor], ...], num_classes: int, in_channels: int, seed: int
) -> DataBundle:
    """DataLoaders over (data set, indices) for train, val and test. Only train shuffles, from the bundle's
    ``shuffle`` generator; the workers' seeds come from its ``workers`` generator, and workers start anew
    each epoch (not persistent), so ``start_epoch`` fixes both the order and the workers' augmentation
    draws: a persistent worker's random state would carry over from the epochs before a resume."""
    shuffle, workers = torch.Generator(), torch.Generator()

    def loader(ds: Dataset, idx: Tensor, train: bool) -> DataLoader | None:
        if not len(idx):
            return None
        subset = Subset(ds, _limit(idx, cfg.limit).tolist())
        return DataLoader(
            subset,
            batch_size=cfg.batch_size,
            sampler=RandomSampler(subset, generator=shuffle) if train else None,
            num_workers=_workers(cfg),
            pin_memory=torch.cuda.is_available(),
            generator=workers if train else torch.Generator().manual_seed(seed),
        )

    train, val, test = (loader(ds, idx, i == 0) for i, (ds, idx) in enumerate(splits))
    return DataBundle(train, val, test, num_classes, in_channels, shuffle, seed, workers)


def _official_test(
    cfg: DataConfig, train_aug: Dataset, train_plain: Dataset, test: Dataset, num_classes: int, seed: int
) -> DataBundle:
    """Train/val split of one training set (val without augmentation) plus the official test set."""
    val_idx, train_idx = split_indices(len(train_aug), (cfg.val_fraction,))  # type: ignore[arg-type]
    test_idx = torch.arange(len(test))  # type: ignore[arg-type]
    splits = ((train_aug, train_idx), (train_plain, val_idx), (test, test_idx))
    return _loader_bundle(cfg, splits, num_classes, 3, seed)


@DATASETS.register(shape=lambda cfg: Shape(3, (32, 32), 10))
def cifar10(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from torchvision.datasets import CIFAR10

    return _cifar(cfg, device, seed, CIFAR10, 10)


@DATASETS.register(shape=lambda cfg: Shape(3, (32, 32), 100))
def cifar100(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from torchvision.datasets import CIFAR100

    return _cifar(cfg, device, seed, CIFAR100, 100)


def _cifar(cfg: DataConfig, device: torch.device, seed: int, cls: type, classes: int) -> DataBundle:
    """torchvision reads (and downloads) the files; the images then live on the device as uint8."""
    train = cls(cfg.root, train=True, download=cfg.download)
    test = cls(cfg.root, train=False, download=cfg.download)
    prep = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # noqa: E731 - uint8 [N, 3, 32, 32]
    label = lambda d: torch.tensor(d.targets, dtype=torch.long)  # noqa: E731
    return _tensor_bundle(cfg, prep(train), label(train), prep(test), label(test), classes, device, seed,
                          Augment(padding=4, flip=True, cutout=cfg.cutout))


@DATASETS.register(shape=lambda cfg: Shape(3, (cfg.image_size, cfg.image_size), 1000))
def imagenet(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    """Streams through DataLoader workers; each batch moves to ``device`` in the training loop."""
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


def _dvs_frames(cfg: DataConfig, size: int) -> tuple[Tensor, Tensor]:
    """Every recording binned into ``timesteps`` frames of ``size`` pixels, once: tonic reads the events and
    ``ToFrame`` bins them the first time, then the frames come from one tensor file under ``data.root``."""
    import tonic

    path = Path(cfg.root) / "CIFAR10DVS" / f"frames_T{cfg.timesteps}_{size}px.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["x"], blob["y"]
    ds = tonic.datasets.CIFAR10DVS(cfg.root, transform=_Frames(cfg.timesteps, size))
    logger(__name__).info(f"binning {len(ds)} CIFAR10-DVS recordings into {cfg.timesteps} frames, once -> {path}")
    batches = list(DataLoader(ds, batch_size=64, num_workers=_workers(cfg)))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])
    buffer = io.BytesIO()
    torch.save({"x": x, "y": y}, buffer)
    atomic_write(path, buffer.getbuffer())  # a run killed while binning leaves no half-written cache
    return x, y


@DATASETS.register(shape=lambda cfg: Shape(2, (min(cfg.image_size, 128),) * 2, 10))
def cifar10dvs(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    """CIFAR10-DVS has no official split: 10% test, then ``val_fraction`` of the rest for validation. The
    frames are held on the training device like CIFAR's images."""
    if not cfg.download and not os.path.isdir(os.path.join(cfg.root, "CIFAR10DVS")):
        raise DataNotFoundError(
            f"CIFAR10-DVS not found under {cfg.root}/CIFAR10DVS (set data.download=true to fetch it)"
        )
    x, y = _dvs_frames(cfg, min(cfg.image_size, 128))
    test_idx, rest = split_indices(len(x), (0.1,))
    return _tensor_bundle(cfg, x[rest], y[rest], x[test_idx], y[test_idx], 10, device, seed)


def load_data(cfg: DataConfig, device: torch.device, seed: int = 0) -> DataBundle:
    try:
        return DATASETS[cfg.name](cfg, device, seed)
    except RuntimeError as err:  # torchvision's message names neither the folder nor our key
        if "Dataset not found" not in str(err):
            raise
        raise DataNotFoundError(f"{cfg.name} not found under {cfg.root} (set data.download=true to fetch it, "
                                f"or data.root to where it is)") from None


def encode(x: Tensor, timesteps: int, encoding: str) -> Tensor:
    """Images [B, C, H, W] -> inputs [T, B, C, H, W]; event frames [B, T, C, H, W] are transposed."""
    if x.dim() == 5:
        return x.transpose(0, 1).contiguous()
    if encoding == "poisson":
        return (torch.rand((timesteps, *x.shape), device=x.device) < x).to(x.dtype)
    return x.unsqueeze(0).expand(timesteps, *x.shape)

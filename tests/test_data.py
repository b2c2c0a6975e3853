"""Each loader reads small files that the tests write in the data set's real on-disk format."""

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ConfigError, DataConfig, build
from trainer.data import Augment, DataBundle, TensorLoader, encode, load_data, split_indices

CPU = torch.device("cpu")


def test_digits_splits_are_disjoint_and_fixed():
    a = load_data(DataConfig(batch_size=1000), CPU, seed=1)
    b = load_data(DataConfig(batch_size=1000), CPU, seed=2)
    assert (len(a.train.x), len(a.val.x), len(a.test.x)) == (1150, 288, 359)
    assert torch.equal(a.val.x, b.val.x)  # the validation split does not depend on the run seed
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    train, val, test = rows(a.train.x), rows(a.val.x), rows(a.test.x)
    assert not (train & val) and not (train & test) and not (val & test)  # no image in two splits
    assert a.train.x.min() == 0 and a.train.x.max() == 1 and a.num_classes == 10 and a.in_channels == 1


def test_digits_are_kept_in_the_data_folder_and_read_back_without_scikit_learn(tmp_path, monkeypatch):
    import sys

    from sklearn.datasets import load_digits

    cfg = DataConfig(batch_size=1000, root=str(tmp_path))
    first = load_data(cfg, CPU, seed=1)
    kept = tmp_path / "digits" / "digits.npz"
    assert kept.is_file() and [p.name for p in kept.parent.iterdir()] == ["digits.npz"]  # no partial file left
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now raises ImportError
    again = load_data(cfg, CPU, seed=1)
    assert all(torch.equal(a, b) for a, b in [(first.train.x, again.train.x), (first.test.y, again.test.y)])
    raw = load_digits()
    assert torch.equal(torch.cat([again.train.x, again.val.x, again.test.x]).mul(16).sort(0).values,
                       torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1).sort(0).values)
    kept.write_bytes(kept.read_bytes()[:100])  # a truncated file is read again from scikit-learn
    monkeypatch.delitem(sys.modules, "sklearn.datasets")
    assert torch.equal(load_data(cfg, CPU, seed=1).train.x, first.train.x) and np.load(kept)["images"].shape == (
        1797, 8, 8)


def test_split_indices_partition_the_set():
    parts = split_indices(100, (0.2, 0.3))
    assert [len(p) for p in parts] == [20, 30, 50]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))


def test_shuffled_batches_cover_the_set_once():
    data = load_data(DataConfig(batch_size=100), CPU)
    ys = torch.cat([y for _, y in data.train])
    assert len(ys) == len(data.train.y) and len(data.train) == 12
    assert torch.equal(ys.sort().values, data.train.y.sort().values)
    assert not torch.equal(ys, data.train.y)


def test_direct_and_poisson_encoding():
    x = torch.tensor([[[[0.0, 1.0], [0.25, 0.75]]]]).repeat(500, 1, 1, 1)
    direct = encode(x, 3, "direct")
    assert direct.shape == (3, 500, 1, 2, 2) and torch.equal(direct[2], x)
    torch.manual_seed(0)
    spikes = encode(x, 8, "poisson")
    assert set(spikes.unique().tolist()) == {0.0, 1.0}
    rates = spikes.mean(dim=(0, 1)).flatten()
    torch.testing.assert_close(rates, torch.tensor([0.0, 1.0, 0.25, 0.75]), atol=0.02, rtol=0)
    frames = torch.rand(4, 6, 2, 5, 5)  # event frames arrive as [B, T, C, H, W]
    assert torch.equal(encode(frames, 6, "direct"), frames.transpose(0, 1))


def _write_idx(path, array: np.ndarray, magic: int):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, train: int, test: int) -> None:
    """MNIST's four idx files under ``root/MNIST/raw``, random images, labels 0-9 in turn."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 0x801)


def test_mnist_reads_idx_files(tmp_path):
    write_mnist(tmp_path, train=50, test=20)
    data = load_data(DataConfig(name="mnist", root=str(tmp_path), batch_size=8), CPU)
    assert (len(data.train.x), len(data.val.x), len(data.test.x)) == (40, 10, 20)
    assert data.train.x.shape[1:] == (1, 28, 28) and data.train.x.dtype == torch.uint8  # on the device as bytes
    x, _ = next(iter(data.train))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert sorted(data.test.y.tolist()) == sorted((np.arange(20) % 10).tolist())


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_python_pickles(tmp_path, monkeypatch, name):
    import os

    from torchvision.datasets import cifar

    # the md5 sums of the real files cannot match files written here: check presence only
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    rng = np.random.default_rng(0)
    batch = lambda n, key: {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(range(n))}  # noqa: E731
    if name == "cifar10":
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for i in range(1, 6):
            _pickle(folder / f"data_batch_{i}", batch(10, "labels"))
        _pickle(folder / "test_batch", batch(10, "labels"))
        _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        _pickle(folder / "train", batch(50, "fine_labels"))
        _pickle(folder / "test", batch(10, "fine_labels"))
        _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    data = load_data(DataConfig(name=name, root=str(tmp_path), batch_size=4, val_fraction=0.2), CPU)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert sum(len(b[1]) for b in data.train) == 40 and sum(len(b[1]) for b in data.val) == 10
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.in_channels == 3
    # the final retraining: no validation split, all 50 training images; cutout zeroes a square (clipped at
    # the border) on top of the same crops and flips
    zeros = {}
    for cutout in (0, 16):
        data = load_data(DataConfig(name=name, root=str(tmp_path), batch_size=50, val_fraction=0, cutout=cutout), CPU)
        x, _ = next(iter(data.train))
        assert data.val is None and len(x) == 50 and data.train.x.device == CPU and data.train.x.dtype == torch.uint8
        zeros[cutout] = (x == 0).all(1).flatten(1).sum(1)
    assert (zeros[16] >= zeros[0]).all() and (zeros[16] - zeros[0]).float().mean() > 100


def test_batched_augmentation_matches_torchvision_per_image():
    """Each image of a batch is cropped, flipped and cut out exactly as torchvision would with its draws."""
    from torchvision.transforms import functional as TF

    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augment = Augment(padding=4, flip=True, cutout=8)
    params = augment.draw(64, 32, torch.Generator().manual_seed(1))
    out = augment(augment.prepare(x), params)
    for img, got, (top, left, flip, cy, cx) in zip(x, out, params.tolist()):
        want = TF.crop(TF.pad(img, [4]), top, left, 32, 32)
        want = TF.hflip(want) if flip else want
        want[:, max(0, cy - 4):cy + 4, max(0, cx - 4):cx + 4] = 0  # Cutout: side 8 around (cy, cx), clipped
        assert torch.equal(got, want)


def test_augmentation_draws_are_uniform_and_fixed_by_seed_and_epoch():
    draws = Augment(padding=4, flip=True, cutout=16).draw(90_000, 32, torch.Generator().manual_seed(0))
    top, left, flip = draws[:, 0], draws[:, 1], draws[:, 2]
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    counts = torch.bincount(top * 9 + left, minlength=81).float()
    assert counts.min() > 0.9 * 90_000 / 81 and counts.max() < 1.1 * 90_000 / 81  # every crop offset alike
    assert abs(flip.float().mean().item() - 0.5) < 0.01
    assert draws[:, 3:].min() == 0 and draws[:, 3:].max() == 31

    # the batches of epoch 3 are the same in an unbroken run and in one resumed at epoch 3
    x, y = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100)

    def batches(epoch, before):
        shuffle = torch.Generator()
        loader = TensorLoader(x, y, 16, shuffle, Augment(cutout=8))
        bundle = DataBundle(loader, None, loader, 10, 3, shuffle, seed=5)
        for e in before:
            bundle.start_epoch(e)
            list(loader)
        bundle.start_epoch(epoch)
        return list(loader)

    unbroken, resumed, other = batches(3, range(3)), batches(3, []), batches(4, [])
    assert all(torch.equal(a, b) and torch.equal(i, j) for (a, i), (b, j) in zip(unbroken, resumed))
    assert not torch.equal(unbroken[0][0], other[0][0])


def test_cutout_is_for_cifar():
    with pytest.raises(ConfigError, match="'data.cutout': cutout is for cifar10 and cifar100"):
        build({"data": {"name": "mnist", "cutout": 8}})


def test_imagenet_reads_prepared_folders(tmp_path):
    wnids = ["n01440764", "n01443537"]
    torch.save(({w: (f"class {w}",) for w in wnids}, wnids * 2), tmp_path / "meta.bin")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for w in wnids:
            (tmp_path / split / w).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / w / f"{w}_{i}.JPEG"
                )
    data = load_data(DataConfig(name="imagenet", root=str(tmp_path), image_size=32, batch_size=3), CPU)
    x, y = next(iter(data.train))
    assert x.shape == (3, 3, 32, 32) and data.num_classes == 2
    assert sum(len(b[1]) for b in data.test) == 4 and sum(len(b[1]) for b in data.val) == 2


def test_cifar10dvs_reads_aedat4_into_frames_once(tmp_path, monkeypatch):
    dv = pytest.importorskip("dv_processing", reason="dev extra: writes real AEDAT4 files")
    root = tmp_path / "CIFAR10DVS"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(100):  # tonic wants >= 1000 files to consider the set extracted
            store = dv.EventStore()
            for t in np.sort(rng.integers(0, 10_000, 20)):
                store.push_back(int(t), int(rng.integers(128)), int(rng.integers(128)), bool(label % 2))
            writer = dv.io.MonoCameraWriter(
                str(root / cls / f"{i}.aedat4"), dv.io.MonoCameraWriter.EventOnlyConfig("DVS128", (128, 128))
            )
            writer.writeEvents(store)
            del writer
    (root / "CIFAR10DVS.zip").write_bytes(b"")  # the archive tonic checks for before extracting
    cfg = DataConfig(name="cifar10dvs", root=str(tmp_path), timesteps=5, image_size=32, batch_size=6, limit=12)
    data = load_data(cfg, CPU)
    x, y = next(iter(data.train))
    assert x.shape == (6, 5, 2, 32, 32) and data.in_channels == 2 and data.num_classes == 10
    assert x.sum() > 0
    frames = encode(x, 5, "direct")
    assert frames.shape == (5, 6, 2, 32, 32)
    assert len(data.test.x) == 12 and len(data.val.x) == 12  # limit applies per split
    cache = root / "frames_T5_32px.pt"
    assert cache.exists() and len(torch.load(cache)["x"]) == 1000  # all recordings, binned once

    import tonic  # the next run reads the cached frames: binning again would fail here

    monkeypatch.setattr(tonic.transforms.ToFrame, "__call__", lambda *a: pytest.fail("binned twice"))
    again = load_data(cfg, CPU)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)


def test_missing_dvs_data_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR10-DVS not found under"):
        load_data(DataConfig(name="cifar10dvs", root=str(tmp_path)), CPU)


def test_an_unknown_data_set_falls_through_to_no_loader():
    """The registry answers every name: an unregistered one (past the config's check) is an error naming the
    registered ones, not a CIFAR10-DVS run."""
    from trainer.errors import UserError

    with pytest.raises(UserError, match=r"unknown data set 'bogus' \(allowed: digits, mnist, .*, cifar10dvs\)"):
        load_data(DataConfig.model_construct(name="bogus"), CPU)


class _RandomCrops(torch.utils.data.Dataset):
    """Stands in for a file data set whose transform draws random numbers in the DataLoader's workers."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.full((1,), float(i)) + torch.rand(1), i


def test_dataloader_batches_after_a_resume_equal_an_unbroken_runs_with_workers():
    from trainer.data import _loader_bundle

    ds, cfg = _RandomCrops(), DataConfig(batch_size=4, num_workers=2)
    split = torch.arange(24)

    def batches(epoch, before):
        bundle = _loader_bundle(cfg, ((ds, split), (ds, split), (ds, split)), 10, 1, seed=3)
        for e in before:
            bundle.start_epoch(e)
            list(bundle.train)
        bundle.start_epoch(epoch)
        return torch.cat([x for x, _ in bundle.train])

    unbroken, resumed = batches(2, range(2)), batches(2, [])
    assert torch.equal(unbroken, resumed)  # the order and the workers' draws
    assert not torch.equal(unbroken, batches(1, []))


def test_an_epochs_seeds_are_the_same_in_every_process():
    """A resumed run is a new process, whose str hashes are salted anew (PYTHONHASHSEED): the order and the
    workers' draws of an epoch must not depend on them."""
    import os
    import subprocess
    import sys

    code = ("from trainer.data import DataBundle; b = DataBundle([], None, [], 10, 1, __import__('torch').Generator(), "
            "seed=3); b.start_epoch(2); print(b.shuffle.initial_seed(), b.workers.initial_seed())")
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": salt}).stdout for salt in ("1", "2")}
    assert len(seeds) == 1

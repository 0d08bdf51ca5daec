"""Data sets and loaders: real digits, synthetic tensors, a generated image folder, and rank sharding."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_hrnas.config import DataConfig
from dist_hrnas.data import Datasets, build_datasets, build_loaders
from dist_hrnas.errors import UserError

N_DIGITS = 1797


def _re(path: Path) -> str:
    """A pytest.raises pattern that matches the path literally."""
    return re.escape(str(path))


# ----------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits", image_size=32))


def test_digits_shapes_and_sizes(digits):
    assert (digits.channels, digits.num_classes, digits.image_size) == (1, 10, 32)
    assert len(digits.train) + len(digits.val) == N_DIGITS
    assert len(digits.val) == round(N_DIGITS * 0.2)
    x, y = digits.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    for split in (digits.train, digits.val):
        assert set(split.tensors[1].tolist()) == set(range(10))


def test_digits_normalised_with_train_stats(digits):
    x = digits.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1) < 1e-4
    assert torch.isfinite(digits.val.tensors[0]).all()


def test_digits_deterministic_and_seeded(digits):
    again = build_datasets(DataConfig(name="digits", image_size=32))
    for a, b in ((digits.train, again.train), (digits.val, again.val)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other = build_datasets(DataConfig(name="digits", image_size=32, split_seed=1))
    assert len(other.val) == len(digits.val)
    assert not torch.equal(other.val.tensors[0], digits.val.tensors[0])


def test_digits_other_size_and_fraction():
    ds = build_datasets(DataConfig(name="digits", image_size=16, val_fraction=0.5))
    assert ds.train[0][0].shape == (1, 16, 16)
    assert len(ds.val) == round(N_DIGITS * 0.5) and len(ds.train) == N_DIGITS - len(ds.val)


# -------------------------------------------------------------------------------------------- synthetic


def _synthetic_cfg(**kw) -> DataConfig:
    base = dict(name="synthetic", image_size=24, synthetic_train_size=40, synthetic_val_size=12,
                synthetic_classes=5, synthetic_channels=3)
    return DataConfig(**{**base, **kw})


def test_synthetic_shapes_sizes_classes():
    ds = build_datasets(_synthetic_cfg())
    assert (len(ds.train), len(ds.val), ds.num_classes, ds.channels, ds.image_size) == (40, 12, 5, 3, 24)
    x, y = ds.train[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([ds.train.tensors[1], ds.val.tensors[1]])
    assert labels.min() >= 0 and labels.max() < 5


def test_synthetic_deterministic():
    a, b = build_datasets(_synthetic_cfg()), build_datasets(_synthetic_cfg())
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    c = build_datasets(_synthetic_cfg(split_seed=7))
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


# ------------------------------------------------------------------------------------------ imagefolder

SIZES = [(40, 30), (50, 64), (33, 33)]


def _write_images(class_dir: Path, seed: int) -> None:
    class_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i, (w, h) in enumerate(SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        ext = ".png" if i % 2 == 0 else ".JPG"  # upper case on purpose: extensions match case-insensitively
        Image.fromarray(pixels).save(class_dir / f"img{i}{ext}", format="PNG" if ext == ".png" else "JPEG")


def _make_folder(root: Path) -> Path:
    for s, split in enumerate(("train", "val")):
        for c, name in enumerate(("cat", "dog")):
            _write_images(root / split / name, seed=10 * s + c)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    return root


def _folder_cfg(root: Path | str, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=24, **kw)


def test_imagefolder_loader_with_workers(tmp_path):
    ds = build_datasets(_folder_cfg(_make_folder(tmp_path / "data")))
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 3, 24)
    assert len(ds.train) == 6 and len(ds.val) == 6
    train, val, sampler = build_loaders(ds, batch_size=2, num_workers=2, seed=0)
    assert sampler is None
    seen = []
    for loader in (train, val):
        for x, y in loader:
            assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert y.dtype == torch.int64
            seen += y.tolist()
    assert sorted(set(seen)) == [0, 1]
    assert len(seen) == 12


def test_imagefolder_val_deterministic_train_random(tmp_path):
    ds = build_datasets(_folder_cfg(_make_folder(tmp_path / "data")))
    assert torch.equal(ds.val[1][0], ds.val[1][0])
    torch.manual_seed(0)
    crops = [ds.train[1][0] for _ in range(4)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    torch.manual_seed(0)  # the crops come from torch's RNG only, so reseeding replays them
    assert all(torch.equal(ds.train[1][0], c) for c in crops)
    plain = build_datasets(_folder_cfg(tmp_path / "data", augment=False))
    assert torch.equal(plain.train[1][0], plain.train[1][0])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="data.root is empty"):
        build_datasets(_folder_cfg(""))
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=_re(missing)):
        build_datasets(_folder_cfg(missing))

    no_val = tmp_path / "no_val"
    _write_images(no_val / "train" / "a", seed=0)
    with pytest.raises(UserError, match=_re(no_val / "val")):
        build_datasets(_folder_cfg(no_val))

    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    with pytest.raises(UserError, match=_re(no_classes / "train")):
        build_datasets(_folder_cfg(no_classes))

    mismatch = tmp_path / "mismatch"
    _write_images(mismatch / "train" / "a", seed=0)
    _write_images(mismatch / "val" / "b", seed=1)
    with pytest.raises(UserError, match=_re(mismatch / "val")):
        build_datasets(_folder_cfg(mismatch))

    no_images = tmp_path / "no_images"
    _write_images(no_images / "train" / "a", seed=0)
    (no_images / "val" / "a").mkdir(parents=True)
    (no_images / "val" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=_re(no_images / "val")):
        build_datasets(_folder_cfg(no_images))


def test_imagefolder_corrupt_image(tmp_path):
    root = _make_folder(tmp_path / "data")
    bad = root / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    ds = build_datasets(_folder_cfg(root))
    index = next(i for i, (p, _) in enumerate(ds.val.samples) if p == bad)
    with pytest.raises(UserError, match=_re(bad)) as direct:
        ds.val[index]
    assert "\n" not in str(direct.value)
    # Through worker processes the error keeps its type and its single-line message.
    _, val, _ = build_loaders(ds, batch_size=2, num_workers=2, seed=0)
    try:
        list(val)
    except UserError as err:
        message = str(err)
        # torch's re-raised exception sits in a reference cycle that holds the loader's iterator; left to
        # the garbage collector, its queues are closed first and each worker join waits out a 5 s timeout.
        # Dropping the traceback and the loader stops the workers now, by reference count.
        err.__traceback__ = None
    else:
        pytest.fail("a corrupt image went through the loader")
    del val
    assert str(bad) in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- loaders


class _NumpyDraw(torch.utils.data.Dataset):
    """Returns a numpy draw, to see how the loader seeds numpy in its workers."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, int]:
        return int(np.random.randint(2**31)), torch.utils.data.get_worker_info().id


def test_loader_workers_seed_numpy_per_worker():
    ds = Datasets(train=_NumpyDraw(), val=_NumpyDraw(), num_classes=1, channels=1, image_size=1)
    runs = []
    for _ in range(2):
        _, val, _ = build_loaders(ds, batch_size=1, num_workers=2, seed=4)
        runs.append([(int(x), int(w)) for x, w in val])
        del val
    assert runs[0] == runs[1]  # same seed -> same numpy streams
    by_worker = {w: x for x, w in runs[0]}
    assert len(set(by_worker.values())) == 2  # but a different stream in each worker


def test_loaders_single_rank_deterministic_order():
    ds = build_datasets(_synthetic_cfg())
    orders = []
    for _ in range(2):
        train, val, sampler = build_loaders(ds, batch_size=8, num_workers=0, seed=3)
        assert sampler is None and train.drop_last and not val.drop_last
        orders.append(torch.cat([y for _, y in train]))
    assert torch.equal(orders[0], orders[1])
    assert len(orders[0]) == 40  # 40 = 5 full batches of 8
    small, _, _ = build_loaders(ds, batch_size=64, num_workers=0, seed=3)
    assert not small.drop_last and sum(len(y) for _, y in small) == 40


def test_loaders_two_ranks_shard_data():
    ds = build_datasets(_synthetic_cfg(synthetic_train_size=41, synthetic_val_size=13))
    train_sets, val_sets = [], []
    for rank in range(2):
        train, val, sampler = build_loaders(ds, batch_size=4, num_workers=0, seed=5, rank=rank, world_size=2)
        assert sampler is not None and sampler is train.sampler
        sampler.set_epoch(1)
        train_sets.append(set(iter(sampler)))
        val_sets.append(list(iter(val.sampler)))
        assert len(val.sampler) == (7 if rank == 0 else 6)  # no padding: nothing is counted twice
    assert not train_sets[0] & train_sets[1]
    assert len(train_sets[0]) == len(train_sets[1]) == 20  # drop_last: 41 -> 2 x 20
    assert set(val_sets[0]) | set(val_sets[1]) == set(range(13))
    assert sorted(val_sets[0] + val_sets[1]) == list(range(13))

"""Data sets and loaders: scikit-learn digits, synthetic tensors, or an ImageNet-style image folder.

Everything here is deterministic given ``DataConfig.split_seed`` (the split and the in-memory tensors) and the
``seed`` passed to :func:`build_loaders` (data order and the per-worker augmentation RNG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset, default_collate

from dist_hrnas.config import DataConfig
from dist_hrnas.errors import UserError
from dist_hrnas.models.layout import to_format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUT_FIX = "set data.root=DIR with train/ and val/ class folders"


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int
    channels: int  # image channels the loader yields
    image_size: int


class ImageDecodeError(UserError):
    """A file that PIL cannot decode.

    Raised inside DataLoader workers, where torch re-raises it in the main process as
    ``ImageDecodeError("Caught ImageDecodeError in DataLoader worker ...\\nOriginal Traceback ...")``; the
    constructor keeps only the original one-line message so the CLI still prints a single line.
    """

    def __init__(self, msg: str) -> None:
        marker = f"{type(self).__name__}: "
        if "\n" in msg and marker in msg:
            msg = msg.rstrip().splitlines()[-1].split(marker, 1)[-1]
        super().__init__(msg)


# ----------------------------------------------------------------------------------------------- digits


def _digits(cfg: DataConfig) -> Datasets:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(raw.target.astype(np.int64))
    # Resize once here rather than per sample: the set is tiny and the result is the same every epoch.
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    n = len(labels)
    n_val = round(n * cfg.val_fraction)
    perm = torch.from_numpy(np.random.default_rng(cfg.split_seed).permutation(n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_x = images[train_idx]
    # Statistics of the training split only, so validation numbers do not leak into preprocessing.
    mean, std = train_x.mean(), train_x.std()

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous()

    return Datasets(train=TensorDataset(norm(train_x), labels[train_idx]),
                    val=TensorDataset(norm(images[val_idx]), labels[val_idx]),
                    num_classes=10, channels=1, image_size=cfg.image_size)


# -------------------------------------------------------------------------------------------- synthetic


def _synthetic(cfg: DataConfig) -> Datasets:
    gen = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.synthetic_channels, cfg.image_size, cfg.image_size)

    def make(n: int) -> TensorDataset:
        x = torch.randn((n, *shape), generator=gen)
        y = torch.randint(0, cfg.synthetic_classes, (n,), generator=gen, dtype=torch.int64)
        return TensorDataset(x, y)

    return Datasets(train=make(cfg.synthetic_train_size), val=make(cfg.synthetic_val_size),
                    num_classes=cfg.synthetic_classes, channels=cfg.synthetic_channels,
                    image_size=cfg.image_size)


# ------------------------------------------------------------------------------------------ imagefolder


def _uniform(lo: float, hi: float) -> float:
    # torch's RNG, not Python's: DataLoader reseeds torch per worker, so workers draw different crops.
    return float(torch.empty(()).uniform_(lo, hi))


def _random_resized_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering 8-100% of the area with aspect ratio 3/4..4/3."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * _uniform(0.08, 1.0)
        aspect = math.exp(_uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return left, top, left + w, top + h
    # Fallback (as in the usual Inception crop): the whole image, trimmed to the allowed aspect range.
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to round(size / 0.875), then take the central size x size square."""
    short = round(size / 0.875)
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, int(short * h / w))
    else:
        new_w, new_h = max(short, int(short * w / h)), short
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """``split_dir/<class>/<image>``; decoding happens in ``__getitem__`` so it runs in the loader workers."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, train: bool, augment: bool) -> None:
        self.samples = samples
        self.image_size = image_size
        self.random_crop = train and augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # PIL's "cannot identify image file '<path>'" would repeat the path; say what it means instead.
            reason = ("not a known image format, or the file is corrupt" if isinstance(err, UnidentifiedImageError)
                      else (str(err).splitlines() or [type(err).__name__])[0])
            raise ImageDecodeError(f"cannot decode image {path}: {reason}; replace or delete the file") from None
        s = self.image_size
        if self.random_crop:
            box = _random_resized_crop_box(*img.size)
            img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)  # crop + resize in one resampling pass
            if bool(torch.rand(()) < 0.5):
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = _resize_center_crop(img, s)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std, label


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_names(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder(cfg: DataConfig) -> Datasets:
    if not cfg.root:
        raise UserError(f"data.root is empty: {_LAYOUT_FIX}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} is not an existing directory: {_LAYOUT_FIX}")
    split_dirs = {split: root / split for split in ("train", "val")}
    for split, d in split_dirs.items():
        if not d.is_dir():
            raise UserError(f"{d} not found: data.root must hold train/ and val/ folders, one subfolder per class")
    classes = _class_names(split_dirs["train"])
    if not classes:
        raise UserError(f"{split_dirs['train']} has no class folders: put each class's images in train/<class>/")
    val_classes = _class_names(split_dirs["val"])
    if val_classes != classes:
        missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise UserError(f"class folders differ between {split_dirs['train']} and {split_dirs['val']} "
                        f"(missing in val: {missing}, only in val: {extra}): use the same class names in both")
    datasets = {}
    for split, d in split_dirs.items():
        samples = [(p, label) for label, name in enumerate(classes) for p in _list_images(d / name)]
        if not samples:
            raise UserError(f"{d} holds no image files ({' '.join(IMAGE_EXTENSIONS)}): "
                            f"add images under {d}/<class>/")
        datasets[split] = ImageFolder(samples, cfg.image_size, train=split == "train", augment=cfg.augment)
    return Datasets(train=datasets["train"], val=datasets["val"], num_classes=len(classes), channels=3,
                    image_size=cfg.image_size)


# ----------------------------------------------------------------------------------------------- public


def build_datasets(cfg: DataConfig) -> Datasets:
    """The train and validation sets that ``cfg.name`` selects."""
    builders = {"digits": _digits, "synthetic": _synthetic, "imagefolder": _imagefolder}
    return builders[cfg.name](cfg)


def _seed_worker(worker_id: int) -> None:
    # torch already gives each worker its own seed (base seed + worker id); derive numpy's from it so any
    # numpy randomness is per worker and reproducible too. Module level so it pickles for spawn start methods.
    np.random.seed(torch.initial_seed() % 2**32)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2*world, ...: disjoint shards, no padding, fixed order."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_channels_last(batch: list) -> list:
    """``default_collate`` with the images in ``torch.channels_last`` (``train.channels_last``): done here, in the
    workers, every batch of every use (training, validation, BN re-calibration) arrives in the model's format,
    and ``.to(device)`` keeps it."""
    images, *rest = default_collate(batch)
    return [to_format(images, torch.channels_last), *rest]  # canonical strides, also for 1-channel images


def build_loaders(ds: Datasets, batch_size: int, num_workers: int, seed: int,
                  rank: int = 0, world_size: int = 1, channels_last: bool = False,
                  ) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    """Train and val loaders for one rank, plus the train sampler (call ``set_epoch`` on it) or None.

    ``channels_last``: image batches in ``torch.channels_last`` (:func:`collate_channels_last`)."""
    train_sampler: DistributedSampler | None = None
    val_sampler: ShardSampler | None = None
    if world_size > 1:
        train_sampler = DistributedSampler(ds.train, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=True)
        # Not DistributedSampler for val: it pads the last shard with repeats, which the summed
        # accuracy would then count twice. Strided shards cover every sample exactly once.
        val_sampler = ShardSampler(len(ds.val), rank, world_size)  # type: ignore[arg-type]
    # The generator orders the data when there is no sampler and, in every case, draws the workers' base
    # seed; adding the rank keeps augmentation streams different across ranks.
    generator = torch.Generator().manual_seed(seed + rank)
    per_rank = len(train_sampler) if train_sampler is not None else len(ds.train)  # type: ignore[arg-type]
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=num_workers > 0, worker_init_fn=_seed_worker if num_workers > 0 else None,
                  collate_fn=collate_channels_last if channels_last else None)
    train = DataLoader(ds.train, shuffle=train_sampler is None, sampler=train_sampler,
                       drop_last=per_rank > batch_size, generator=generator, **common)
    val = DataLoader(ds.val, shuffle=False, sampler=val_sampler, drop_last=False,
                     generator=torch.Generator().manual_seed(seed + rank), **common)
    return train, val, train_sampler

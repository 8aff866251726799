"""Datasets: Fashion-MNIST (Debian idx files or torchvision), CIFAR-10/100, STL-10, ImageFolder; the two-view wrapper.

Every base dataset returns (PIL image, int label). Splits:
- pretraining: the training split (STL-10: train+unlabeled), minus `data.holdout`, first `data.limit` images;
- kNN bank / probe training: the labelled training split minus the holdout, first `data.limit` images;
- validation: the held-out tail of the training split when `data.holdout > 0`, else the test split; first
  `data.val_limit` images.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from batchssl.config import DataConfig
from batchssl.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int  # natural size; images are square after the transforms
    mean: tuple[float, ...]
    std: tuple[float, ...]


INFO = {
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo(10, 3, 96, IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": DatasetInfo(0, 3, 224, IMAGENET_MEAN, IMAGENET_STD),  # classes counted from the folders
}


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    info = INFO[cfg.name]
    size = cfg.image_size or info.image_size
    if cfg.name == "imagefolder":
        train_dir = Path(cfg.root) / "train"
        classes = sorted(p for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
        return DatasetInfo(len(classes), 3, size, info.mean, info.std)
    return DatasetInfo(info.num_classes, info.in_channels, size, info.mean, info.std)


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C); returns (PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index]), int(self.labels[index])


class Slice(Dataset):
    """A contiguous range of another dataset (keeps label access cheap, unlike a generic Subset of indices)."""

    def __init__(self, base: Dataset, start: int, stop: int):
        self.base, self.start, self.stop = base, start, min(stop, len(base))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.base[self.start + index]


class Transformed(Dataset):
    """(transform(image), label) for evaluation."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def sample_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on the given integers (stable across processes and Python runs)."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TwoViews(Dataset):
    """Indexed by (epoch, index): returns ([view_1, view_2], label).

    The augmentation randomness is seeded from (seed, epoch, index) alone, so it does not depend on the number
    of processes, of loader workers, or on whether the run was resumed: resumed runs reproduce their losses.
    """

    def __init__(self, base: Dataset, view_transforms: Sequence[Callable], seed: int):
        self.base, self.view_transforms, self.seed = base, list(view_transforms), seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label = self.base[index]
        s = sample_seed(self.seed, epoch, index)
        in_main_process = torch.utils.data.get_worker_info() is None
        if in_main_process:  # leave the trainer's generators (BatchFormer dropout) as they were
            saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        # torchvision draws from torch's generator, lightly's blur/solarize from numpy.
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        views = [t(image) for t in self.view_transforms]
        if in_main_process:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
        return views, label


class EpochShardSampler(Sampler):
    """Yields (epoch, index) for this process: a permutation seeded by (seed, epoch), dealt out rank::world.

    With drop_last the permutation is cut to a multiple of the global batch first, so every process gets the
    same number of full batches, and global batch b of W processes holds the same images as batch b of one
    process with the same global batch.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.global_batch, self.seed, self.rank, self.world = size, global_batch, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.global_batch // self.world

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)[: self.steps_per_epoch() * self.global_batch]
        for index in order[self.rank :: self.world].tolist():
            yield (self.epoch, index)


# ---------------------------------------------------------------------------------------------------- sources


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(cfg: DataConfig, train: bool) -> Dataset:
    prefix = "train" if train else "t10k"
    candidates = [Path(cfg.root), Path(cfg.root) / "fashion-mnist", Path(cfg.root) / "FashionMNIST" / "raw",
                  DEBIAN_FASHION_MNIST]
    for folder in candidates:
        for suffix in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return ArrayImages(_read_idx(images), _read_idx(labels))
    if cfg.download:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(cfg.root, train=train, download=True)
        return ArrayImages(ds.data.numpy(), ds.targets.numpy())
    raise UserError(
        f"Fashion-MNIST not found in {cfg.root} or {DEBIAN_FASHION_MNIST}: run `make setup` (installs Debian's "
        "dataset-fashion-mnist) or add data.download=true to fetch it with torchvision"
    )


def _torchvision(cfg: DataConfig, split: str) -> Dataset:
    from torchvision import datasets

    try:
        if cfg.name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
            ds = cls(cfg.root, train=split == "train", download=cfg.download)
            return ArrayImages(ds.data, np.asarray(ds.targets))
        ds = datasets.STL10(cfg.root, split=split, download=cfg.download)
        return ArrayImages(ds.data.transpose(0, 2, 3, 1), ds.labels)  # unlabeled images have label -1
    except RuntimeError as err:
        raise UserError(f"{cfg.name} not found in {cfg.root} ({err}): add data.download=true to fetch it, "
                        "or set data.root to the folder that holds it") from None


def _image_folder(cfg: DataConfig, split: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: data.root must hold train/<class>/* and val/<class>/*")
    return ImageFolder(str(folder))


def load_split(cfg: DataConfig, split: str) -> Dataset:
    """split: 'train' (labelled training images), 'test', or 'pretrain' (all training images, labels optional)."""
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg, train=split != "test")
    if cfg.name == "imagefolder":
        return _image_folder(cfg, split)
    if cfg.name == "stl10" and split == "pretrain":
        return _torchvision(cfg, "train+unlabeled")
    return _torchvision(cfg, "test" if split == "test" else "train")


def _without_holdout(cfg: DataConfig, ds: Dataset, holdout_of: int) -> Dataset:
    # STL-10's pretraining set starts with the 5000 labelled training images: the same holdout comes off their tail
    # and is skipped in the unlabeled part, so the held-out images are never seen during pretraining.
    if cfg.holdout == 0:
        return ds
    if cfg.holdout >= holdout_of:
        raise UserError(f"data.holdout={cfg.holdout} leaves no training images (the split has {holdout_of})")
    keep = Slice(ds, 0, holdout_of - cfg.holdout)
    if len(ds) == holdout_of:
        return keep
    return torch.utils.data.ConcatDataset([keep, Slice(ds, holdout_of, len(ds))])


def _limited(ds: Dataset, limit: int | None) -> Dataset:
    return ds if limit is None or limit >= len(ds) else Slice(ds, 0, limit)


def pretrain_dataset(cfg: DataConfig) -> Dataset:
    ds = load_split(cfg, "pretrain")
    labelled = len(load_split(cfg, "train")) if cfg.name == "stl10" else len(ds)
    return _limited(_without_holdout(cfg, ds, labelled), cfg.limit)


def eval_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(labelled training images for the kNN bank / probe, validation images); untransformed."""
    train = load_split(cfg, "train")
    if cfg.holdout:
        val = Slice(train, len(train) - cfg.holdout, len(train)) if cfg.holdout < len(train) else None
        train = _without_holdout(cfg, train, len(train))
    else:
        val = load_split(cfg, "test")
    return _limited(train, cfg.limit), _limited(val, cfg.val_limit)

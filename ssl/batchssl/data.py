"""Datasets: Fashion-MNIST (Debian idx files or torchvision), CIFAR-10/100, STL-10, ImageFolder; the two-view wrapper.

Every base dataset returns (PIL image, int label). Splits:
- pretraining: the training split (STL-10: train+unlabeled), minus `data.holdout`, first `data.limit` images,
  first `data.pretrain_limit` images, then, with `data.imbalance_ratio` > 1, the long-tailed cut (see `long_tail_rows`);
- kNN bank / probe training: the labelled training split minus the holdout, first `data.limit` images;
- validation: the held-out tail of the training split when `data.holdout > 0`, else the test split; first
  `data.val_limit` images.
The bank, the probes and the validation split never see the long-tailed cut or `pretrain_limit`: they stay balanced.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from batchssl.config import DataConfig
from batchssl.decode import UnreadableImageError
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
    "shards": DatasetInfo(0, 3, 224, IMAGENET_MEAN, IMAGENET_STD),  # classes read from the shard index
}


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    info = INFO[cfg.name]
    size = cfg.image_size or info.image_size
    if cfg.name == "imagefolder":
        train_dir = Path(cfg.root) / "train"
        classes = sorted(p for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
        return DatasetInfo(len(classes), 3, size, info.mean, info.std)
    if cfg.name == "shards":
        from batchssl.shards import read_index

        return DatasetInfo(len(read_index(cfg.root)["classes"]), 3, size, info.mean, info.std)
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


def epoch_order(size: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """The image indices of epoch `epoch`: a permutation seeded by (seed, epoch), cut to whole global batches.
    Both view pipelines deal it (batchssl.pipeline), so they meet the same images at the same steps."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch))
    return torch.randperm(size, generator=generator)[: size // global_batch * global_batch]


class EpochShardSampler(Sampler):
    """Yields (epoch, index) for this process: a permutation seeded by (seed, epoch), dealt out rank::world.

    With drop_last the permutation is cut to a multiple of the global batch first, so every process gets the
    same number of full batches, and global batch b of W processes holds the same images as batch b of one
    process with the same global batch.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.global_batch, self.seed, self.rank, self.world = size, global_batch, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch` from its global batch `start` on (a run resumed from a step checkpoint)."""
        self.epoch, self.start = epoch, start

    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start) * self.global_batch // self.world

    def __iter__(self):
        order = epoch_order(self.size, self.global_batch, self.seed, self.epoch)[self.start * self.global_batch :]
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
    candidates = [
        Path(cfg.root),
        Path(cfg.root) / "fashion-mnist",
        Path(cfg.root) / "FashionMNIST" / "raw",
        DEBIAN_FASHION_MNIST,
    ]
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
        raise UserError(
            f"{cfg.name} not found in {cfg.root} ({err}): add data.download=true to fetch it, "
            "or set data.root to the folder that holds it"
        ) from None


def _image_folder(cfg: DataConfig, split: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: data.root must hold train/<class>/* and val/<class>/*")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(
            f"image folder {folder} has no class folders: data.root must hold train/<class>/* and val/<class>/*"
        )
    try:
        return ImageFolder(str(folder), loader=_load_image)
    except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes a, b. ..."
        empty = str(err).split("for the classes")[-1].split(".")[0].strip()
        raise UserError(
            f"image folder {folder}: no images in the class folder(s) {empty} "
            "(supported: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)"
        ) from None


def _load_image(path: str) -> Image.Image:
    """PIL's RGB image of `path`, decoded now, so a broken file is reported by name (even from a loader worker)."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from None


def load_split(cfg: DataConfig, split: str) -> Dataset:
    """split: 'train' (labelled training images), 'test', or 'pretrain' (all training images, labels optional)."""
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg, train=split != "test")
    if cfg.name == "imagefolder":
        return _image_folder(cfg, split)
    if cfg.name == "shards":
        from batchssl.shards import ShardImages

        return ShardImages(cfg.root, "val" if split == "test" else "train")
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


# ---------------------------------------------------------------------------------------------- pretraining split


class Rows(Dataset):
    """The given rows of another dataset, in the given order (the pretraining split: holdout, limit, long tail)."""

    def __init__(self, base: Dataset, rows: np.ndarray):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.base[int(self.rows[index])]


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images kept per class c = 0 .. C-1: int(n_max * (1 / ratio) ** (c / (C - 1))), at least 1.

    Exactly the arithmetic of Cao et al. 2019 (LDAM-DRW, `IMBALANCECIFAR10.get_img_num_per_cls`, imb_factor =
    1 / ratio), which truncates rather than rounds: CIFAR-10-LT at ratio 100 then has the literature's 12,406
    images (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50) and CIFAR-100-LT its 10,847 (rounding would
    give 12,408 and 10,899). Ratio 1 keeps n_max of every class. One class: n_max. The floor of one image
    (no class vanishes) only matters when n_max < ratio, e.g. a small data.limit.
    """
    if num_classes <= 1 or ratio == 1:
        return [n_max] * num_classes
    return [max(1, int(n_max * (1.0 / ratio) ** (c / (num_classes - 1.0)))) for c in range(num_classes)]


def long_tail_rows(labels: np.ndarray, num_classes: int, ratio: float) -> np.ndarray:
    """Positions (into `labels`, ascending) of the long-tailed subset: class c keeps its FIRST
    long_tail_counts(n_max, C, ratio)[c] images in the given order (all it has if it has fewer), where n_max is
    the size of the most frequent class in `labels`. Class order = label index: class 0 is the head, class C-1
    the tail (the CIFAR-10-LT convention). Deterministic: no random draw.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if ratio == 1:
        return np.arange(len(labels))
    present = np.bincount(labels[labels >= 0], minlength=num_classes)
    quota = np.asarray(long_tail_counts(int(present.max(initial=0)), num_classes, ratio), dtype=np.int64)
    # rank of each image within its class, in order: keep it when the rank is below the class's quota.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return np.flatnonzero(rank < quota[labels])


def _base_labels(ds: Dataset) -> np.ndarray:
    """Labels of a base dataset without decoding an image (ArrayImages, torchvision ImageFolder)."""
    if isinstance(ds, ArrayImages):
        return ds.labels
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets, dtype=np.int64)
    raise TypeError(f"cannot read the labels of {type(ds).__name__} without loading its images")


def _check_long_tail(cfg: DataConfig) -> None:
    if cfg.imbalance_ratio != 1 and cfg.name == "stl10":
        raise UserError(
            "data.imbalance_ratio needs a labelled pretraining split: STL-10 pretrains on 100k "
            "unlabelled images (use cifar10, cifar100, fashion_mnist or imagefolder)"
        )


def _pretrain_rows(cfg: DataConfig) -> tuple[Dataset, np.ndarray]:
    """(base dataset, its rows that form the pretraining split, in order).

    Order of the cuts: holdout, then `limit`, then `pretrain_limit`, then the long-tailed cut.
    - holdout first: the held-out images are the validation split, never pretrained on, whatever the ratio.
    - `limit` before the long tail: `limit` keeps one meaning for every split ("the run uses only the first N
      training images"), so the pretraining images are a subset of the kNN bank's, and the cut then gives the
      exact ratio profile at any size (n_max measured on the limited split). Cutting first and limiting after
      would flatten the profile: the tail classes keep their first images in dataset order, which lie near the
      front, so e.g. the first 5000 of Fashion-MNIST-LT (ratio 100) would hold 785 .. 60 images per class,
      a ratio of 13, not 100. `pretrain_limit` is `limit` for pretraining alone, so it sits at the same place.
    """
    _check_long_tail(cfg)
    base = load_split(cfg, "pretrain")
    labelled = len(load_split(cfg, "train")) if cfg.name == "stl10" else len(base)
    rows = np.arange(len(base), dtype=np.int64)
    if cfg.holdout:
        if cfg.holdout >= labelled:
            raise UserError(f"data.holdout={cfg.holdout} leaves no training images (the split has {labelled})")
        # STL-10's pretraining set starts with its 5000 labelled training images: the holdout comes off their
        # tail and the unlabeled part follows.
        rows = np.concatenate([rows[: labelled - cfg.holdout], rows[labelled:]])
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if cfg.pretrain_limit is not None:
        rows = rows[: cfg.pretrain_limit]
    if cfg.imbalance_ratio != 1:
        labels = _base_labels(base)[rows]
        rows = rows[long_tail_rows(labels, dataset_info(cfg).num_classes, cfg.imbalance_ratio)]
    return base, rows


def pretrain_dataset(cfg: DataConfig) -> Dataset:
    """The pretraining split, untransformed: (PIL image, label) with label -1 for unlabelled images.

    The training split (STL-10: train+unlabeled) minus the last `data.holdout` labelled images, its first `data.limit`
    images, its first `data.pretrain_limit` images, then with `data.imbalance_ratio` = r > 1 the long-tailed cut: class
    c of C keeps its first int(n_max * r^(-c / (C - 1))) images in dataset order (n_max: the most frequent class's count
    before the cut; classes in label order, class 0 the head), the CIFAR-10-LT construction of Cao et al. 2019 (LDAM)
    used by the long-tailed self-supervised literature (see `long_tail_counts`, `long_tail_rows`). The cut applies to
    every labelled dataset (Fashion-MNIST, CIFAR-10/100, ImageFolder); STL-10 refuses it (its pretraining images are
    unlabelled). Only pretraining sees it: `eval_datasets` (kNN bank, probes, validation) stays balanced, the protocol
    of Jiang et al. 2021 (Self-Damaging Contrastive Learning):
    pretrain on the long-tailed subset, evaluate on the balanced splits, report many / medium / few classes.
    """
    base, rows = _pretrain_rows(cfg)
    return Rows(base, rows)


def pretrain_class_counts(cfg: DataConfig) -> list[int] | None:
    """Images per class (index = label) in the pretraining split actually used (holdout, limit and long-tailed
    cut applied), for the per-frequency evaluation. None for STL-10, whose pretraining images are unlabelled."""
    if cfg.name == "stl10":
        _check_long_tail(cfg)
        return None
    base, rows = _pretrain_rows(cfg)
    labels = _base_labels(base)[rows]
    return np.bincount(labels[labels >= 0], minlength=dataset_info(cfg).num_classes).tolist()


def in_memory_pretrain_images(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """The pretraining split as (uint8 images (N, H, W) or (N, H, W, C), int64 labels (N,), -1 = unlabelled),
    the same images in the same order as `pretrain_dataset(cfg)`; None for datasets not held in memory
    (ImageFolder). A view of the loaded array when the split is one contiguous range, else a copy."""
    base, rows = _pretrain_rows(cfg)
    if not isinstance(base, ArrayImages):
        return None
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # ascending, so this means one contiguous range
        take = slice(int(rows[0]), int(rows[-1]) + 1)
        return base.images[take], base.labels[take]
    return base.images[rows], base.labels[rows]


def eval_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(labelled training images for the kNN bank / probe, validation images); untransformed. Balanced whatever
    `data.imbalance_ratio` says: the long-tailed cut is for pretraining only."""
    train = load_split(cfg, "train")
    if cfg.holdout:
        val = Slice(train, len(train) - cfg.holdout, len(train)) if cfg.holdout < len(train) else None
        train = _without_holdout(cfg, train, len(train))
    else:
        val = load_split(cfg, "test")
    return _limited(train, cfg.limit), _limited(val, cfg.val_limit)

"""Per-sample transforms for loader workers: pretraining views built from the spec, evaluation and probe crops.

`view_transforms` builds each view's torchvision chain from `batchssl.views.view_specs`, the one declaration of
the presets that the device path reads too, with lightly's blocks where PIL does the op (Gaussian blur: PIL's
extended box blur; solarisation: PIL's). Each draws from torch's and numpy's global generators, which
`data.TwoViews` seeds per sample.
"""

from __future__ import annotations

import torchvision.transforms as T
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.solarize import RandomSolarization

from batchssl.config import Config
from batchssl.data import DatasetInfo
from batchssl.views import ViewSpec, view_specs


def _off(r, center: float) -> tuple[float, float]:
    """A range for ColorJitter: (center, center) is torchvision's "this op is off"."""
    return r if r is not None else (center, center)


def spec_transform(spec: ViewSpec, info: DatasetInfo) -> T.Compose:
    """One view's chain (PIL image in, normalised tensor out), in batchssl.views' order of ops."""
    jitter = T.ColorJitter(
        brightness=_off(spec.brightness, 1.0),
        contrast=_off(spec.contrast, 1.0),
        saturation=_off(spec.saturation, 1.0),
        hue=_off(spec.hue, 0.0),
    )
    steps = [
        T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio),
        T.RandomHorizontalFlip(p=spec.hflip),
        T.RandomApply([jitter], p=spec.jitter),
        T.RandomGrayscale(p=spec.gray),
    ]
    if spec.blur > 0:
        steps.append(GaussianBlur(sigmas=spec.sigmas, prob=spec.blur))
    if spec.solarize > 0:
        steps.append(RandomSolarization(prob=spec.solarize))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(info.mean, info.std)])


def view_transforms(cfg: Config, info: DatasetInfo) -> list[T.Compose]:
    """Every view's transform for pretraining (two global views, then the local crops)."""
    return [spec_transform(spec, info) for spec in view_specs(cfg, info)]


def eval_transform(info: DatasetInfo) -> T.Compose:
    """Evaluation: no augmentation. Large images: resize to 256/224 of the size, then centre crop."""
    steps = []
    if info.image_size >= 64:
        steps += [T.Resize(int(round(info.image_size * 256 / 224))), T.CenterCrop(info.image_size)]
    else:
        steps += [T.Resize(info.image_size), T.CenterCrop(info.image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(info.mean, info.std)])


PROBE_CROPS = ("auto", "resized", "padded")


def probe_train_transform(info: DatasetInfo, crop: str = "auto") -> T.Compose:
    """Linear-probe training augmentation: a random crop + horizontal flip.

    crop="resized": MoCo v3 / SimSiam's RandomResizedCrop (scale 0.08-1; 0.2-1 below 64 px); "padded": a crop of
    the image's own size from the image zero-padded by 1/8 of its side, the usual small-image augmentation, which
    keeps the object's scale; "auto": resized from 64 px up, padded below.
    """
    if crop not in PROBE_CROPS:
        raise ValueError(f"crop must be one of {PROBE_CROPS}, got {crop!r}")
    if crop == "auto":
        crop = "resized" if info.image_size >= 64 else "padded"
    if crop == "resized":
        first = T.RandomResizedCrop(info.image_size, scale=(0.08, 1.0) if info.image_size >= 64 else (0.2, 1.0))
    else:
        first = T.RandomCrop(info.image_size, padding=max(info.image_size // 8, 1))
    return T.Compose([first, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(info.mean, info.std)])

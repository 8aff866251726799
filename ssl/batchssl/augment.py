"""View transforms from lightly's building blocks, sized for each dataset and correct for grayscale input.

- SimSiam: MoCo v2's augmentation (lightly's SimSiamViewTransform), the same recipe for both views.
- MoCo v3: BYOL's asymmetric pair (lightly's BYOLView1Transform / BYOLView2Transform): view 1 always blurred,
  view 2 rarely blurred and sometimes solarised.
Grayscale datasets: saturation, hue and random-grayscale are no-ops on one channel, so they are switched off rather
than pretending; normalisation uses the dataset's one-channel statistics.
Small images (< 64 px): no Gaussian blur (as SimSiam/MoCo CIFAR setups do; at 32 px it wipes the image out).
"""

from __future__ import annotations

import torchvision.transforms as T
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.transforms.simsiam_transform import SimSiamViewTransform

from batchssl.config import Config
from batchssl.data import DatasetInfo


def preset_for(cfg: Config) -> str:
    if cfg.augment.preset != "auto":
        return cfg.augment.preset
    return "byol" if cfg.method.name == "mocov3" else "simsiam"


def view_transforms(cfg: Config, info: DatasetInfo) -> list:
    """The two view transforms for pretraining."""
    aug = cfg.augment
    preset = preset_for(cfg)
    blur = aug.blur if aug.blur is not None else info.image_size >= 64
    gray = info.in_channels == 1
    common = dict(
        input_size=info.image_size,
        cj_strength=aug.color_jitter,
        cj_prob=0.8 if aug.color_jitter > 0 else 0.0,
        hf_prob=aug.hflip,
        random_gray_scale=0.0 if gray else 0.2,
        normalize={"mean": list(info.mean), "std": list(info.std)},
    )
    if gray:
        common.update(cj_sat=0.0, cj_hue=0.0)
    # Blur sigma in lightly is in pixels for 224 px images; scale it with the image so 96 px images blur alike.
    sigmas = (0.1 * info.image_size / 224, 2.0 * info.image_size / 224)
    if preset == "simsiam":
        view = SimSiamViewTransform(min_scale=aug.min_scale or 0.2, gaussian_blur=0.5 if blur else 0.0,
                                    sigmas=sigmas, **common)
        return [view, view]
    solarize = aug.solarize
    kwargs = dict(min_scale=aug.min_scale or 0.08, sigmas=sigmas, **common)
    return [
        BYOLView1Transform(gaussian_blur=1.0 if blur else 0.0, solarization_prob=0.0, **kwargs),
        BYOLView2Transform(gaussian_blur=0.1 if blur else 0.0, solarization_prob=0.2 if solarize else 0.0, **kwargs),
    ]


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

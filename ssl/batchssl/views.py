"""Views as a spec, made on the training device with batched operations and per-sample random parameters.

The spec. `view_specs(cfg, info)` is the one declaration of the augmentation presets: a frozen `ViewSpec` per view
(output size, crop scale and ratio, each op's probability and range). Both pipelines read it: `DeviceViews` here,
and `batchssl.augment.view_transforms`, which builds the per-sample torchvision / lightly chain of the loader-worker
path from the same specs. The views of a step are, in this order:

- `GLOBAL_VIEWS` (2) global crops at the image size, by `augment.preset`: SimSiam's (MoCo v2's augmentation, the
  same for both) or BYOL's asymmetric pair (view 1 always blurred, view 2 rarely blurred and sometimes solarised);
- `augment.local_crops` local crops (SwAV / DINO multi-crop): `augment.local_size` px (default 96/224 of the image
  size, a multiple of 4: 96 at 224 px, 12 at 28 px) from `augment.local_scale` (0.05, 0.4) of the image's area,
  with the global views' colour ops, blur at p 0.5 (DINO's local crops), no solarisation.

Each view's chain, on whole batches (torchvision.transforms.v2.functional semantics on float tensors in [0, 1],
clamped after every op):

    RandomResizedCrop -> horizontal flip -> RandomApply(ColorJitter) -> RandomGrayscale -> Gaussian blur
    -> solarisation -> Normalize

Randomness. Every random number of a step is drawn on the CPU from one `torch.Generator` seeded by
`data.sample_seed(seed, epoch, step)`: uniforms laid out (global_batch, views, DRAWS_PER_VIEW), whatever the spec.
A sample's views depend only on (seed, epoch, step, position in the global batch): not on the number of processes,
nor on torch's global generator, which is never used. With two views the draws are those of every earlier version
of this module, so the two-view recipes' views and losses are unchanged.

Entry points (all parameters are CPU tensors, one row per sample, in `ViewParams`):
- `DeviceViews(cfg, info)(images, seed, epoch, step, positions)`: the views of uint8 images (B, C, H, W) held on
  the device; one float32 tensor per view, (B, C, size, size), normalised, in the trainer's memory format
  (channels_last for ResNets with train.channels_last, as the model).
- `step_params(specs, seed, epoch, step, global_batch, positions, heights, widths)`: the per-view parameters of
  some positions of a step, for images of their own sizes (ints, or one height / width per position). A loader
  worker calls it with one position and the decoded image's size to cut that sample's crops (`ViewParams.top`,
  `left`, `height`, `width`); the step's draws are cached, so a worker handling a batch draws them once.
- `DeviceViews.render_crops(crops, params)`: the views from crops already cut and resized to each view's size
  (one uint8 (B, C, size_v, size_v) tensor per view): flip, colour ops, blur, solarisation and normalisation with
  the same parameters, batched on the crops' device. `DeviceViews.render(images, params)` does the same from whole
  images, cropping first.
- `crop_boxes(...)`: RandomResizedCrop.get_params vectorised; heights / widths may differ per sample.

Device work. The parameters (crop boxes, flips, jitter factors and order, grayscale / blur / solarise choices)
are turned into one float32 tensor on the CPU, including the index lists of the samples each op applies to, and
copied to the device once per call; from there on there is no host-device synchronisation and no loop over
samples: ops apply to contiguous index-selected sub-batches whose sizes are known on the host.

- crop+resize: `resized_crop(..., bilinear, antialias=False)` exactly (half-pixel centres, sample coordinates
  clamped to the crop), done with `grid_sample` on a per-sample separable grid; the flip is folded into the grid.
  No antialiasing: with the stored images at the output size (the usual case) a global crop is never larger than
  the output, so the resize only upsamples and antialiasing would change nothing. Crops larger than their output
  (local crops, or stored images larger than `info.image_size`) alias a little (torchvision's tensor default, and
  PIL, would antialias).
- crop parameters: `RandomResizedCrop.get_params` (10 attempts of area and log-ratio, first valid one, else the
  central crop with the ratio clamped), vectorised: 10 attempts drawn for every sample.
- colour jitter: `ColorJitter` with each sample's own factors and its own random order of the four ops.
- blur: torchvision's gaussian_blur (reflect padding) with a per-sample sigma, in [0.1, 2.0] * image size / 224 (as
  lightly's sigmas for 224 px, scaled to the image; local crops keep the global sigmas, as DINO's do), and one
  kernel size per view: the odd size covering +-3 sigma of the largest sigma. lightly blurs with PIL's
  ImageFilter.GaussianBlur (an extended box blur of the same sigma).
- solarisation: lightly's RandomSolarization (PIL's solarize, threshold 128): values >= 128/255 inverted.
Grayscale datasets: saturation, hue and random grayscale off (no-ops on one channel).
Small images (< 64 px): no blur unless augment.blur says so (as SimSiam / MoCo CIFAR setups: at 32 px it wipes
the image out).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchssl.config import Config
from batchssl.data import DatasetInfo, sample_seed
from batchssl.errors import UserError

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
CROP_ATTEMPTS = 10
SOLARIZE_THRESHOLD = 128 / 255
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision's fn_idx numbering
GLOBAL_VIEWS = 2  # views[:GLOBAL_VIEWS] are the global crops (a teacher's or a momentum encoder's inputs)
LOCAL_SIZE_RATIO = 96 / 224  # DINO / SwAV: 96 px local crops beside 224 px global ones

# Uniform draws per sample and view, in this column order (changing it changes every run's views).
_AREA, _LOGR = slice(0, CROP_ATTEMPTS), slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _FLIP, _CJ = range(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 4)
_ORDER, _FACTORS = slice(_CJ + 1, _CJ + 5), slice(_CJ + 5, _CJ + 9)
_GRAY, _BLUR, _SIGMA, _SOLAR = range(_CJ + 9, _CJ + 13)
DRAWS_PER_VIEW = _SOLAR + 1

Range = tuple[float, float] | None
Size = int | torch.Tensor  # one image size for all samples, or one per sample


# ------------------------------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class ViewSpec:
    """One view: output size, crop, and each op's probability and range (a range None: that op is off).

    Ranges are torchvision ColorJitter's resolved (min, max) factors; sigmas are in output pixels.
    """

    size: int
    scale: tuple[float, float]
    hflip: float
    jitter: float
    brightness: Range
    contrast: Range
    saturation: Range
    hue: Range
    gray: float
    blur: float
    sigmas: tuple[float, float]
    solarize: float
    ratio: tuple[float, float] = RATIO

    @property
    def jitter_ranges(self) -> tuple[Range, Range, Range, Range]:
        """In torchvision's fn_idx order (brightness, contrast, saturation, hue)."""
        return (self.brightness, self.contrast, self.saturation, self.hue)


def _jitter_range(value: float, center: float, clip_zero: bool) -> Range:
    """torchvision's ColorJitter._check_input for a single number."""
    low, high = center - value, center + value
    if clip_zero:
        low = max(low, 0.0)
    return None if low == high == center else (low, high)


BYOL_PRESET_METHODS = ("mocov3", "byol", "barlowtwins", "vicreg", "dino")


def preset_for(cfg: Config) -> str:
    """augment.preset, with auto resolved: BYOL's asymmetric pair for the methods whose papers use it (MoCo v3, BYOL,
    Barlow Twins, VICReg, DINO), MoCo v2's symmetric one for SimSiam and SimCLR."""
    if cfg.augment.preset != "auto":
        return cfg.augment.preset
    return "byol" if cfg.method.name in BYOL_PRESET_METHODS else "simsiam"


def local_size(cfg: Config, info: DatasetInfo) -> int:
    """augment.local_size, or 96/224 of the image size rounded to a multiple of 4 (a ViT patch), at least 8."""
    if cfg.augment.local_size is not None:
        return cfg.augment.local_size
    return max(8, 4 * round(info.image_size * LOCAL_SIZE_RATIO / 4))


def view_specs(cfg: Config, info: DatasetInfo) -> list[ViewSpec]:
    """Every view of a step: the preset's two global views, then augment.local_crops local ones.

    SimSiam: MoCo v2's augmentation (lightly's SimSiamViewTransform: crop 0.2-1, blur p 0.5), both views alike.
    BYOL: lightly's BYOLView1Transform / BYOLView2Transform (crop 0.08-1; blur p 1.0 / 0.1; solarise p 0 / 0.2).
    Both: flip 0.5, colour jitter p 0.8 of strength augment.color_jitter (0.4, 0.4, saturation 0.4 SimSiam /
    0.2 BYOL, 0.1), grayscale p 0.2.
    """
    aug = cfg.augment
    preset = preset_for(cfg)
    blur = aug.blur if aug.blur is not None else info.image_size >= 64
    gray = info.in_channels == 1
    s = aug.color_jitter
    sat = 0.4 if preset == "simsiam" else 0.2  # lightly's cj_sat: SimSiamViewTransform 0.4, BYOL views 0.2
    if s * 0.1 > 0.5:
        raise ValueError(f"augment.color_jitter={s} makes the hue range exceed [-0.5, 0.5]")
    common = dict(
        hflip=aug.hflip,
        jitter=0.8 if s > 0 else 0.0,
        brightness=_jitter_range(s * 0.4, 1.0, True),
        contrast=_jitter_range(s * 0.4, 1.0, True),
        saturation=None if gray else _jitter_range(s * sat, 1.0, True),
        hue=None if gray else _jitter_range(s * 0.1, 0.0, False),
        gray=0.0 if gray else 0.2,
        sigmas=(0.1 * info.image_size / 224, 2.0 * info.image_size / 224),
    )
    size = info.image_size
    if preset == "simsiam":
        view = ViewSpec(size=size, scale=(aug.min_scale or 0.2, 1.0), blur=0.5 if blur else 0.0, solarize=0.0, **common)
        views = [view, view]
    else:
        scale = (aug.min_scale or 0.08, 1.0)
        views = [
            ViewSpec(size=size, scale=scale, blur=1.0 if blur else 0.0, solarize=0.0, **common),
            ViewSpec(
                size=size, scale=scale, blur=0.1 if blur else 0.0, solarize=0.2 if aug.solarize else 0.0, **common
            ),
        ]
    local = ViewSpec(
        size=local_size(cfg, info), scale=tuple(aug.local_scale), blur=0.5 if blur else 0.0, solarize=0.0, **common
    )
    if aug.local_crops and local.size != size and cfg.model.arch.startswith("vit"):
        raise UserError(
            f"augment.local_crops: the built-in {cfg.model.arch} takes only {size} px inputs, the local "
            f"crops are {local.size} px; set augment.local_size={size} or use a ResNet"
        )
    return views + [local] * aug.local_crops


def blur_kernel_size(sigma_max: float, size: int) -> int:
    """Odd kernel covering +-3 sigma of the largest sigma; at most what reflect padding allows on `size` px."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    return max(1, min(k, 2 * size - 1))


# ------------------------------------------------------------------------------------------------- parameters


@dataclass
class ViewParams:
    """One view's parameters for a batch of samples (CPU tensors, one row per sample)."""

    top: torch.Tensor  # long: crop box in the input image
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    fallback: torch.Tensor  # bool: the crop is RandomResizedCrop's central fallback (no attempt was valid)
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    order: torch.Tensor  # long (B, 4): torchvision's fn_idx (0 brightness, 1 contrast, 2 saturation, 3 hue)
    factors: torch.Tensor  # float (B, 4): brightness, contrast, saturation, hue factors (identity where off)
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float
    solarize: torch.Tensor  # bool


def crop_boxes(
    u_area: torch.Tensor,
    u_logr: torch.Tensor,
    u_top: torch.Tensor,
    u_left: torch.Tensor,
    height: Size,
    width: Size,
    scale: Sequence[float],
    ratio: Sequence[float] = RATIO,
):
    """RandomResizedCrop.get_params vectorised over samples, from uniforms in [0, 1).

    u_area, u_logr: (B, attempts); u_top, u_left: (B,). height, width: the input images' size, an int or a (B,)
    tensor (images of different sizes). Returns top, left, h, w (long, (B,)) and the fallback mask.
    """
    u_area, u_logr = u_area.double(), u_logr.double()
    n = u_area.shape[0]
    # float64 holds every product and quotient below exactly as torchvision's Python ints and floats do.
    height = torch.as_tensor(height, dtype=torch.float64).expand(n).reshape(n, 1)
    width = torch.as_tensor(width, dtype=torch.float64).expand(n).reshape(n, 1)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_logr)
    w = torch.round(torch.sqrt(target * aspect))  # torch.round and Python's round both round half to even
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first valid attempt
    found = valid.any(dim=1)
    height, width = height.squeeze(1), width.squeeze(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(u_top.double() * (height - h + 1)).clamp(min=0)
    left = torch.floor(u_left.double() * (width - w + 1)).clamp(min=0)
    top, left = torch.minimum(top, height - h), torch.minimum(left, width - w)
    # Fallback: the central crop, the ratio clamped to the range.
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fw = torch.where(in_ratio < lo, width, torch.where(in_ratio > hi, torch.round(height * hi), width))
    fh = torch.where(in_ratio < lo, torch.round(width / lo), height)
    fallback = ~found
    h = torch.where(fallback, fh, h).long()
    w = torch.where(fallback, fw, w).long()
    height, width = height.long(), width.long()
    top = torch.where(fallback, torch.div(height - h, 2, rounding_mode="floor"), top.long())
    left = torch.where(fallback, torch.div(width - w, 2, rounding_mode="floor"), left.long())
    return top, left, h, w, fallback


def view_params(u: torch.Tensor, spec: ViewSpec, height: Size, width: Size) -> ViewParams:
    """One view's parameters from its uniforms u (B, DRAWS_PER_VIEW) for images of the given size(s)."""
    top, left, h, w, fallback = crop_boxes(
        u[:, _AREA], u[:, _LOGR], u[:, _TOP], u[:, _LEFT], height, width, spec.scale, spec.ratio
    )
    identity = (1.0, 1.0, 1.0, 0.0)
    lo = torch.tensor([r[0] if r else i for r, i in zip(spec.jitter_ranges, identity)], dtype=torch.float64)
    hi = torch.tensor([r[1] if r else i for r, i in zip(spec.jitter_ranges, identity)], dtype=torch.float64)
    factors = (lo + (hi - lo) * u[:, _FACTORS]).float()
    sigma = spec.sigmas[0] + (spec.sigmas[1] - spec.sigmas[0]) * u[:, _SIGMA]
    return ViewParams(
        top=top,
        left=left,
        height=h,
        width=w,
        fallback=fallback,
        flip=u[:, _FLIP] < spec.hflip,
        jitter=u[:, _CJ] < spec.jitter,
        order=u[:, _ORDER].argsort(dim=1),  # argsort of iid uniforms: a uniformly random permutation
        factors=factors,
        gray=u[:, _GRAY] < spec.gray,
        blur=u[:, _BLUR] < spec.blur,
        sigma=sigma.float(),
        solarize=u[:, _SOLAR] < spec.solarize,
    )


def step_draws(seed: int, epoch: int, step: int, global_batch: int, views: int) -> torch.Tensor:
    """(global_batch, views, DRAWS_PER_VIEW) float64 uniforms of a step, from its own generator."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, step))
    return torch.rand(global_batch, views, DRAWS_PER_VIEW, generator=generator, dtype=torch.float64)


@functools.lru_cache(maxsize=2)  # a loader worker asks for one position at a time, a whole batch per step
def _cached_draws(seed: int, epoch: int, step: int, global_batch: int, views: int) -> torch.Tensor:
    return step_draws(seed, epoch, step, global_batch, views)


def _positions(positions, global_batch: int) -> torch.Tensor:
    positions = torch.as_tensor(positions).cpu().long().view(-1)
    if len(positions) and not (int(positions.min()) >= 0 and int(positions.max()) < global_batch):
        raise ValueError(f"positions must lie in [0, {global_batch}), got {positions.tolist()[:8]}...")
    return positions


def step_params(
    specs: Sequence[ViewSpec],
    seed: int,
    epoch: int,
    step: int,
    global_batch: int,
    positions: int | Sequence[int] | torch.Tensor,
    heights: Size,
    widths: Size,
) -> list[ViewParams]:
    """Every view's parameters for some positions of a step's global batch (an int: one position).

    heights, widths: the input images' size, one for all or one per position. The same numbers as DeviceViews
    draws for these positions: a worker cutting crops and the device rendering them agree.
    """
    positions = _positions(positions, global_batch)
    u = _cached_draws(seed, epoch, step, global_batch, len(specs))[positions]
    return [view_params(u[:, v], spec, heights, widths) for v, spec in enumerate(specs)]


# -------------------------------------------------------------------------------------------------- batched ops
# x: float (n, C, H, W) in [0, 1]; per-sample factors: (n,) on x's device.


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma (torchvision's weights); one-channel images are returned as they are."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    y = x if inplace else x.clone()
    return y.mul_(_per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    f = _per_sample(f)
    channel_means = x.mean(dim=(2, 3))  # the mean of the grayscale image, without making it
    if x.shape[1] == 3:
        mean = sum(channel_means[:, c] * GRAY_WEIGHTS[c] for c in range(3))
    else:
        mean = channel_means[:, 0]
    y = x if inplace else x.clone()
    return y.mul_(f).add_(_per_sample(mean) * (1 - f)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    f = _per_sample(f)
    gray = rgb_to_grayscale(x).mul_(1 - f)
    y = x if inplace else x.clone()
    return y.mul_(f).add_(gray).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torchvision's RGB -> HSV, hue + f modulo 1, HSV -> RGB, in closed form.

    With chroma = max - min (= v s) and h6 = 6 h in [0, 6), the shifted hue's pure colour is
    (clamp(|h6 - 3| - 1), clamp(2 - |h6 - 2|), clamp(2 - |h6 - 4|)) (clamped to [0, 1]) and the output is
    min + chroma * pure: max, min and chroma do not change under a hue rotation.
    """
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    max_is_r, max_is_g = maxc == r, maxc == g
    num = torch.where(
        max_is_r, g - b, torch.where(max_is_g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4))
    )
    h6 = num.div_(torch.where(chroma == 0, 1.0, chroma)).add_(6.0 * f.view(-1, 1, 1)).remainder_(6.0)
    out = x if inplace else torch.empty_like(x)
    for n, (sign, center, shift) in enumerate(((1.0, 3.0, -1.0), (-1.0, 2.0, 2.0), (-1.0, 4.0, 2.0))):
        pure = (h6 - center).abs_().mul_(sign).add_(shift).clamp_(0.0, 1.0)
        torch.addcmul(minc, chroma, pure, out=out[:, n])
    return out


JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(n, kernel_size) normalised 1-D Gaussians, one per sigma (torchvision's _get_gaussian_kernel1d)."""
    d = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - (kernel_size - 1) / 2
    kernel = torch.exp(-(d.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).float() ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur: separable grouped convolutions (one group per sample and channel), reflect pad."""
    n, c, height, width = x.shape
    if n == 0 or kernel_size <= 1:
        return x
    kernel = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # (n*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, height, width)


def solarize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values >= 128/255 inverted in the samples of `mask` (bool (n,))."""
    return torch.where(_per_sample(mask) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)


def resized_crop(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    flip: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Per-sample crop box resized to size x size (bilinear, half-pixel centres, no antialias), then flipped.

    Equals torchvision's resized_crop(..., antialias=False) (+ hflip) up to float rounding: each output pixel's
    source coordinate (p + 1/2) * w / size - 1/2 is clamped to the crop, as interpolate clamps at its input's
    edge. Box tensors: (n,) on x's device (any numeric dtype).
    """
    n, _, in_h, in_w = x.shape
    p = torch.arange(size, device=x.device, dtype=torch.float32).view(1, -1) + 0.5
    w, h = width.float().view(-1, 1), height.float().view(-1, 1)
    px = torch.where(flip.view(-1, 1).bool(), size - p, p)  # flipped output pixel p reads column size-1-p
    sx = (px * w / size - 0.5).clamp(min=0.0)
    sx = torch.minimum(sx, w - 1) + left.float().view(-1, 1)
    sy = (p * h / size - 0.5).clamp(min=0.0)
    sy = torch.minimum(sy, h - 1) + top.float().view(-1, 1)
    gx = (2 * sx + 1) / in_w - 1  # grid_sample's normalised coordinates (align_corners=False)
    gy = (2 * sy + 1) / in_h - 1
    grid = torch.stack(torch.broadcast_tensors(gx.view(n, 1, size), gy.view(n, size, 1)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------- the views
# Own ops rather than kornia.augmentation: kornia's crop_and_resize maps the box's corner pixels onto the output's
# (not torchvision's half-pixel resize), its ColorJitter draws one op order per batch, it draws from torch's
# global generator, and its colour and blur ops, which do match torchvision, were slower than these on the CPU.
# Per-sample jitter order (re-gathering the jittered rows at each of the 4 slots) cost little against a fixed order.


class _Packer:
    """Collects CPU tensors into one float32 buffer (one copy to the device); hands back device slices."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, t: torch.Tensor) -> tuple[int, int]:
        """Appends t (indices too: float32 holds integers exactly up to 2**24); returns its (offset, size)."""
        t = t.float().reshape(-1)
        key = (self.size, t.numel())
        self.parts.append(t)
        self.size += t.numel()
        return key

    def to(self, device: torch.device) -> torch.Tensor:
        buffer = torch.cat(self.parts) if self.parts else torch.zeros(0)
        if device.type == "cuda":
            buffer = buffer.pin_memory()
        return buffer.to(device, non_blocking=True)


def trainer_memory_format(cfg: Config) -> torch.memory_format:
    """The memory format the trainer gives the model's inputs: channels_last for convolutional backbones (ResNets,
    timm's) with train.channels_last (the rule of batchssl.build.uses_channels_last), else contiguous."""
    from batchssl.backbones import channels_last_arch

    conv = channels_last_arch(cfg.model.arch)
    return torch.channels_last if cfg.train.channels_last and conv else torch.contiguous_format


class DeviceViews:
    """Callable making every view of a batch on the images' device. See the module docstring.

    global_batch: the global batch size, needed when a call gets only this process's rows (`positions`);
    default cfg.train.batch_size. specs: default view_specs(cfg, info). memory_format: the outputs'; default the
    trainer's (trainer_memory_format).
    """

    def __init__(
        self,
        cfg: Config,
        info: DatasetInfo,
        global_batch: int | None = None,
        random_jitter_order: bool = True,
        specs: Sequence[ViewSpec] | None = None,
        memory_format: torch.memory_format | None = None,
    ):
        self.info = info
        self.specs = list(specs) if specs is not None else view_specs(cfg, info)
        self.global_batch = global_batch or cfg.train.batch_size
        self.random_jitter_order = random_jitter_order
        self.memory_format = memory_format or trainer_memory_format(cfg)
        self.kernel_sizes = [blur_kernel_size(s.sigmas[1], s.size) for s in self.specs]
        self.active_ops = [[k for k, rng in enumerate(s.jitter_ranges) if rng is not None] for s in self.specs]
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std on each device

    # ------------------------------------------------------------------ parameters (CPU)

    def draws(self, seed: int, epoch: int, step: int, global_batch: int) -> torch.Tensor:
        """(global_batch, views, DRAWS_PER_VIEW) float64 uniforms of a step, from its own generator."""
        return step_draws(seed, epoch, step, global_batch, len(self.specs))

    def params(
        self,
        seed: int,
        epoch: int,
        step: int,
        height: Size,
        width: Size,
        positions: torch.Tensor | None = None,
        global_batch: int | None = None,
    ) -> list[ViewParams]:
        """Every view's parameters for the rows `positions` of the global batch (all rows when None), for input
        images of size height x width (ints, or one per row)."""
        if positions is None:
            if global_batch is None:
                raise ValueError("params: give positions or global_batch")
            positions = torch.arange(global_batch)
        else:
            global_batch = global_batch or self.global_batch
            positions = _positions(positions, global_batch)
        u = self.draws(seed, epoch, step, global_batch)[positions]
        return [view_params(u[:, v], spec, height, width) for v, spec in enumerate(self.specs)]

    # ------------------------------------------------------------------ the calls

    def __call__(
        self,
        images: torch.Tensor,
        seed: int,
        epoch: int,
        step: int,
        positions: torch.Tensor | None = None,
        global_batch: int | None = None,
    ) -> list[torch.Tensor]:
        """Every view of `images` (uint8 (B, C, H, W), or float in [0, 1]) on their device.

        positions: this process's positions in the global batch (B of them; a CPU LongTensor avoids a device
        sync); None: `images` is the whole global batch. global_batch: default the constructor's (only used with
        positions). Returns one float32 (B, C, size, size) tensor per view, normalised.
        """
        if positions is None:
            global_batch = images.shape[0]
        elif len(positions) != images.shape[0]:
            raise ValueError(f"{len(positions)} positions for {images.shape[0]} images")
        params = self.params(seed, epoch, step, images.shape[-2], images.shape[-1], positions, global_batch)
        return self.render(images, params)

    def render(self, images: torch.Tensor, params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """The views of whole `images` for given parameters (one ViewParams per view, B rows each)."""
        self._check(images, len(params))
        with torch.autocast(images.device.type, enabled=False):
            x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
            return self._render(x, [x] * len(params), params, cropped=False)

    def render_crops(self, crops: Sequence[torch.Tensor], params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """The views from crops already cut and resized (view v: (B, C, size_v, size_v), uint8 or float in
        [0, 1]): everything after the crop, with the same parameters (the crop boxes are not read)."""
        if len(crops) != len(params):
            raise ValueError(f"{len(crops)} crop tensors for {len(params)} views")
        for v, (c, spec) in enumerate(zip(crops, self.specs)):
            self._check(c, len(params))
            if tuple(c.shape[-2:]) != (spec.size, spec.size):
                raise ValueError(f"view {v}: crops of {tuple(c.shape[-2:])} px, the spec says {spec.size}")
        with torch.autocast(crops[0].device.type, enabled=False):
            # A copy in float: the ops below work in place.
            xs = [c.float().div_(255) if c.dtype == torch.uint8 else c.float().clone() for c in crops]
            return self._render(xs[0], xs, params, cropped=True)

    def _check(self, images: torch.Tensor, views: int) -> None:
        if images.shape[1] != self.info.in_channels:
            raise ValueError(f"expected {self.info.in_channels} channels, got images of shape {tuple(images.shape)}")
        if views != len(self.specs):
            raise ValueError(f"{views} views' parameters for a spec of {len(self.specs)} views")

    def _render(self, x, inputs, params, cropped: bool) -> list[torch.Tensor]:
        device = x.device
        packer = _Packer()
        plans = [self._plan(p, packer, v) for v, p in enumerate(params)]
        buffer = packer.to(device)
        if device not in self._stats:
            self._stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                for v in (self.info.mean, self.info.std)
            )
        mean, std = self._stats[device]
        return [
            self._render_view(inp, buffer, plan, mean, std, v, cropped)
            for v, (inp, plan) in enumerate(zip(inputs, plans))
        ]

    def _plan(self, p: ViewParams, packer: _Packer, view: int) -> dict:
        """Host-side plan of one view: which rows each op touches, in which order; tensors go to the packer."""
        n = len(p.flip)
        table = torch.stack(
            [
                p.top.float(),
                p.left.float(),
                p.height.float(),
                p.width.float(),
                p.flip.float(),
                p.gray.float(),
                p.solarize.float(),
                p.sigma.float(),
            ],
            dim=1,
        )
        plan = {
            "n": n,
            "table": packer.add(table),
            "factors": packer.add(p.factors),
            "slots": [],
            "gray": bool(p.gray.any()),
            "solarize": bool(p.solarize.any()),
            "flip": bool(p.flip.any()),
        }
        # Colour jitter: the jittered rows, re-ordered at each slot so that the rows doing op k are contiguous.
        active = self.active_ops[view]
        rows = torch.nonzero(p.jitter).view(-1)
        if len(rows) and active:
            order = p.order[rows]
            if not self.random_jitter_order:
                order = torch.arange(4).expand(len(rows), 4)
            keep = torch.isin(order, torch.tensor(active))
            order = order[keep].view(len(rows), len(active))  # active ops in each sample's order
            previous = None
            for slot in range(len(active)):
                op = order[:, slot]
                sort = torch.sort(op, stable=True).indices  # positions within `rows`
                counts = torch.bincount(op, minlength=4).tolist()
                if previous is None:
                    move = packer.add(rows[sort])  # gather from the batch
                elif torch.equal(sort, previous):
                    move = None  # same order as the previous slot
                else:
                    inverse = torch.empty_like(previous)
                    inverse[previous] = torch.arange(len(previous))
                    move = packer.add(inverse[sort])  # re-order the jittered sub-batch
                plan["slots"].append((move, counts, packer.add(rows[sort])))
                previous = sort
            plan["scatter"] = packer.add(rows[previous])
        blur_rows = torch.nonzero(p.blur).view(-1)
        plan["blur"] = packer.add(blur_rows) if len(blur_rows) and self.kernel_sizes[view] > 1 else None
        return plan

    def _render_view(self, x, buffer, plan, mean, std, view: int, cropped: bool):
        def get(key, shape=(-1,)):
            start, count = key
            return buffer[start : start + count].view(*shape)

        def index(key):
            return get(key).long()

        table = get(plan["table"], (plan["n"], -1))
        factors = get(plan["factors"], (plan["n"], 4))
        top, left, height, width, flip, gray, solar, sigma = table.unbind(1)
        if not cropped:
            y = resized_crop(x, top, left, height, width, flip > 0.5, self.specs[view].size)
        elif plan["flip"]:
            y = torch.where(_per_sample(flip > 0.5), x.flip(-1), x)
        else:
            y = x
        if plan["slots"]:
            sub = None
            for move, counts, rows in plan["slots"]:
                if sub is None:
                    sub = y.index_select(0, index(move))
                elif move is not None:
                    sub = sub.index_select(0, index(move))
                f = factors.index_select(0, index(rows))
                start = 0
                for op, count in enumerate(counts):
                    if count:
                        JITTER_FNS[op](sub[start : start + count], f[start : start + count, op], inplace=True)
                    start += count
            y.index_copy_(0, index(plan["scatter"]), sub)
        if plan["gray"]:
            y = torch.where(_per_sample(gray > 0.5), rgb_to_grayscale(y).expand_as(y), y)
        if plan["blur"] is not None:
            rows = index(plan["blur"])
            y.index_copy_(
                0, rows, gaussian_blur(y.index_select(0, rows), sigma.index_select(0, rows), self.kernel_sizes[view])
            )
        if plan["solarize"]:
            y = solarize(y, solar > 0.5)
        y = y.sub_(mean).div_(std)
        return y.contiguous(memory_format=self.memory_format)

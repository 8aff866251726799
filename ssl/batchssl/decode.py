"""Decode an image file once, at reduced scale where the JPEG allows it, and cut its views' crops from it.

Loader workers call `image_size` (the header only) to draw the crop boxes, then `decode_crops`, which returns
every view's crop resized to the output size as uint8 (S, S, 3) arrays. What happens inside:

- JPEG (baseline or progressive, RGB or grayscale): simplejpeg (libjpeg-turbo, bundled in its wheel) decodes with
  DCT-domain scaling at 1/k, k the largest of 1, 2, 4, 8 such that every crop still has at least the output size
  in pixels after scaling (`dct_factor`). An 8x8 block becomes an (8/k)x(8/k) block, so full-image coordinate x
  is scaled coordinate x / k exactly, and the crop box is divided by k. Chosen by measurement
  (benchmarks/loader_speed.py --decoders): simplejpeg decoded these photos 1.2-3x faster than PIL (draft) and as
  fast as PyTurboJPEG, which needs a system libjpeg-turbo 3 that most machines lack.
- Anything else (PNG, WebP, BMP, TIFF, CMYK/YCCK JPEG, 16-bit, palette, alpha): PIL's open + convert("RGB"),
  exactly torchvision ImageFolder's loader, at full scale.
- Crop + resize: PIL's resize with a (float) box, bilinear with its antialiasing support, as torchvision's
  RandomResizedCrop does on PIL images; a crop smaller than the output is upscaled, never refused.

EXIF orientation is NOT applied, the policy of torchvision's ImageFolder (and so of data.pipeline=workers, of the
kNN bank and of the probes, which read images with PIL + convert("RGB")): every path sees the same pixels, and
ImageNet-style datasets are stored upright. Rotate phone photos upright before training if their EXIF says so
(e.g. PIL.ImageOps.exif_transpose once, when building the folder).

Errors: a file that cannot be read or decoded raises UnreadableImageError naming it (one line, exit 2).

On a GPU (data.decode gpu, or auto on CUDA): `decode_crops_on_device` decodes a step's JPEGs in one batched
`torchvision.io.decode_jpeg(list, device="cuda")` call (nvJPEG: baseline JPEGs batched on the A100/H100/H200
hardware decoder, progressive ones by nvJPEG's GPU-assisted software path) at full scale, then cuts each box and
resizes it with F.interpolate(bilinear, antialias=True), the tensor form of the same filter (torchvision's
resized_crop on tensors). Why torchvision and not NVIDIA DALI's "mixed" decoder (fn.decoders.image, or
image_random_crop that decodes only the crop's region): torchvision is already pinned, its call takes our own crop
boxes (DALI draws its own crops in its own pipeline graph, which would break the (seed, epoch, step, position)
stream) and it needs no new multi-hundred-MB dependency whose wheels follow the CUDA version. DALI decodes more
formats on the GPU and fuses ROI decoding; worth a look only if gpu_check.sh shows the decode as the step's
bottleneck. torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec: the call is one line
here to swap when the pin moves. nvJPEG takes YCbCr and grayscale JPEGs (not CMYK/YCCK, nor Adobe RGB-coded
ones, nor arithmetic coding), so `device_decodable` sends only those to the device; the rest, and a file whose
data does not end with the JPEG end marker (truncated, or with trailing bytes), are decoded by the loader worker
as above. A batch nvJPEG still refuses (one bad file fails the whole call) is retried image by image, and an
image it refuses alone is decoded on the CPU here, which names it if it is unreadable.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from batchssl.errors import UserError

if TYPE_CHECKING:  # torch is imported where the device path runs: the file converter and workers need only PIL
    import torch

DCT_FACTORS = (8, 4, 2, 1)
Box = tuple[int, int, int, int]  # top, left, height, width in full-image pixels

try:  # optional: without it every JPEG takes PIL's full-scale path
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is in requirements.txt
    simplejpeg = None


class UnreadableImageError(UserError):
    """An image file that cannot be decoded (truncated, corrupt, not an image)."""


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _fast_jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) when simplejpeg can decode this JPEG to RGB (not CMYK/YCCK), else None."""
    if simplejpeg is None or not _is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in ("Gray", "YCbCr", "RGB") else None


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header, as PIL reports it (no EXIF rotation)."""
    fast = _fast_jpeg_header(data)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {name}: {err}") from None


def dct_factor(boxes: Sequence[Box], sizes: Sequence[int]) -> int:
    """The largest k in (8, 4, 2, 1) such that every box keeps at least its output size on both sides after
    scaling by 1 / k (box v is resized to sizes[v]); 1 when a box is smaller than its output (it is upscaled)."""
    fits = lambda k: all(min(h, w) / k >= size for (_, _, h, w), size in zip(boxes, sizes))  # noqa: E731
    return next(k for k in DCT_FACTORS if k == 1 or fits(k))


def decode(data: bytes, name: str, factor: int = 1) -> tuple[np.ndarray, int]:
    """The image as uint8 (H', W', 3) RGB and the factor k it was decoded at (H' = ceil(H / k)).

    factor > 1 is honoured for JPEGs simplejpeg reads; other files come back at full scale (k = 1)."""
    if _fast_jpeg_header(data) is not None:
        height, width = _fast_jpeg_header(data)
        try:
            if factor == 1:
                return simplejpeg.decode_jpeg(data, colorspace="RGB"), 1
            # min size ceil(H / k) forbids factors above k, min_factor = k those below it: exactly 1 / k.
            array = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_height=math.ceil(height / factor),
                min_width=math.ceil(width / factor),
                min_factor=factor,
            )
            return array, factor
        except ValueError as err:  # truncated or corrupt data (strict mode reports libjpeg's warnings too)
            raise UnreadableImageError(f"cannot read image {name}: {err}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB")), 1
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {name}: {err}") from None


def resized_crops(image: np.ndarray, boxes: Sequence[Box], sizes: Sequence[int], factor: int = 1) -> list[np.ndarray]:
    """Each box (full-image pixels) of an image decoded at 1 / factor, resized to sizes[v] x sizes[v] (PIL
    bilinear, antialiased when it shrinks, as torchvision's RandomResizedCrop on PIL images)."""
    pil = Image.fromarray(image)
    out = []
    for (top, left, h, w), size in zip(boxes, sizes):
        # At 1 / k the last block row / column may be partial (ceil(H / k) px): clamp the box to the image.
        x0, y0 = left / factor, top / factor
        x1, y1 = min((left + w) / factor, pil.width), min((top + h) / factor, pil.height)
        # Crop first (to whole pixels around the box), then resize the box within it: the filter never reads
        # outside the crop, as torchvision's crop-then-resize (with factor 1, exactly its pixels).
        cx, cy = math.floor(x0), math.floor(y0)
        crop = pil.crop((cx, cy, math.ceil(x1), math.ceil(y1)))
        out.append(np.asarray(crop.resize((size, size), Image.BILINEAR, box=(x0 - cx, y0 - cy, x1 - cx, y1 - cy))))
    return out


def decode_crops(
    data: bytes, boxes: Sequence[Box], sizes: int | Sequence[int], name: str, reduce: bool = True
) -> list[np.ndarray]:
    """Every box's crop of the encoded image resized to its view's size, uint8 (size, size, 3), from one decode.

    sizes: one output size for all boxes or one per box. reduce=False decodes at full scale (the reference the
    reduced-scale path is tested against)."""
    sizes = [sizes] * len(boxes) if isinstance(sizes, int) else list(sizes)
    factor = dct_factor(boxes, sizes) if reduce else 1
    image, factor = decode(data, name, factor)
    return resized_crops(image, boxes, sizes, factor)


def read_file(path: str) -> bytes:
    """The file's bytes; a missing or unreadable file raises UnreadableImageError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UnreadableImageError(f"cannot read image {path}: {err.strerror or err}") from None
    if not data:
        raise UnreadableImageError(f"cannot read image {path}: the file is empty (0 bytes)")
    return data


def device_decodable(data: bytes) -> bool:
    """Whether nvJPEG can decode this file to RGB: a whole (end marker last) YCbCr or grayscale JPEG."""
    if not _is_jpeg(data) or data[-2:] != b"\xff\xd9":
        return False
    try:
        if simplejpeg is None:  # PIL's header read: CMYK and YCCK both open as mode CMYK
            with Image.open(io.BytesIO(data)) as image:
                return image.mode in ("RGB", "L")
        return simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray")
    except (OSError, ValueError):
        return False


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Encoded JPEGs (uint8 (bytes,) CPU tensors) as uint8 (3, H, W) RGB on `device`, in one torchvision call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:  # torchvision refuses an empty list (a step whose rows all went to the worker)
        return []
    with warnings.catch_warnings():  # torchvision 0.29 warns at every call that TorchCodec will take over
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)


def decode_crops_on_device(
    datas: Sequence[bytes | torch.Tensor],
    boxes,
    sizes: int | Sequence[int],
    device: torch.device | str,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Each view's crops of n encoded JPEGs decoded together on `device`: one uint8 (n, 3, S_v, S_v) per view.

    boxes: (n, views, 4) (top, left, height, width) in full-image pixels; sizes: one output size or one per view;
    names: the files, for error messages. Works on any device torchvision decodes on (the CPU included)."""
    import torch

    device = torch.device(device)
    boxes = torch.as_tensor(boxes).tolist()
    views = len(boxes[0]) if boxes else (1 if isinstance(sizes, int) else len(sizes))
    sizes = [sizes] * views if isinstance(sizes, int) else list(sizes)
    names = list(names) if names is not None else [f"image {i}" for i in range(len(datas))]
    datas = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images = decode_jpegs(datas, device)
    except RuntimeError:  # one file nvJPEG refuses fails the whole call: find it, decode it here
        images = [_decode_one(data, name, device) for data, name in zip(datas, names)]
    crops: list[list[torch.Tensor]] = [[] for _ in sizes]
    for image, image_boxes, name in zip(images, boxes, names):
        for v, ((top, left, h, w), size) in enumerate(zip(image_boxes, sizes)):
            if top + h > image.shape[1] or left + w > image.shape[2]:  # the boxes were drawn on the header's size
                raise UnreadableImageError(f"cannot read image {name}: decoded smaller than its header says")
            # Integer boxes at full scale: the crop is a slice; the filter reads only inside it, as PIL's.
            crop = image[None, :, top : top + h, left : left + w].float()
            crops[v].append(torch.nn.functional.interpolate(crop, (size, size), mode="bilinear", antialias=True))
    return [
        torch.cat(c).round_().clamp_(0, 255).to(torch.uint8)
        if c
        else torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
        for c, size in zip(crops, sizes)
    ]


def _decode_one(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """(3, H, W) uint8 on `device`: nvJPEG alone, else this process's CPU decoder (which names a bad file)."""
    import torch

    try:
        return decode_jpegs([data], device)[0]
    except RuntimeError:
        array, _ = decode(data.numpy().tobytes(), name)
        return torch.tensor(array).permute(2, 0, 1).to(device)  # a copy: PIL's arrays are read-only

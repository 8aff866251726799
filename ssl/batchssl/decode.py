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
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from batchssl.errors import UserError

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

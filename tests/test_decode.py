"""batchssl.decode: reduced-scale JPEG decoding within a stated tolerance of full decoding, every image mode as PIL's
convert("RGB") reads it (EXIF orientation not applied, as torchvision's ImageFolder), bad files named."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from batchssl.decode import (
    UnreadableImageError,
    dct_factor,
    decode,
    decode_crops,
    decode_crops_on_device,
    device_decodable,
    image_size,
    read_file,
)
from batchssl.views import crop_boxes
from benchmarks.make_photo_folder import source_photos

# Reduced-scale decode + crop vs full decode + crop, uint8 levels: the mean absolute difference of a crop stays
# under CROP_TOLERANCE, and over many crops under MEAN_TOLERANCE (measured on the three photos: 0.4-1.6 on
# average, 3.5 at worst, at 32-160 px; the differences are the DCT filter's, at edges). The device decode
# (data.decode gpu) is held to the same bounds against full decode + crop (on the CPU: 0.1-0.2 on average, a level
# at worst; nvJPEG's colour conversion and chroma upsampling may differ from libjpeg-turbo's by a few levels).
CROP_TOLERANCE, MEAN_TOLERANCE = 5.0, 2.0


def rgb_of(path_or_bytes) -> np.ndarray:
    """torchvision ImageFolder's loader: PIL open + convert("RGB")."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photo() -> Image.Image:
    return Image.open(source_photos()["china"]).convert("RGB").resize((160, 120))


def test_dct_factor_keeps_every_crop_at_least_its_output_size():
    assert dct_factor([(0, 0, 400, 300)], [96]) == 2  # 300 / 2 = 150 >= 96; 300 / 4 = 75 < 96
    assert dct_factor([(0, 0, 800, 800)], [96]) == 8
    assert dct_factor([(0, 0, 800, 800), (0, 0, 200, 500)], [96, 96]) == 2  # the smaller crop decides
    assert dct_factor([(0, 0, 800, 800), (0, 0, 200, 200)], [224, 32]) == 2  # each against its own size
    assert dct_factor([(0, 0, 50, 60)], [96]) == 1  # smaller than the output: full scale, then upscaled


@pytest.mark.parametrize("name", ["china", "grace_hopper"])
@pytest.mark.parametrize("size", [48, 96])
def test_reduced_scale_decode_is_within_tolerance_of_full_decode(name, size):
    data = source_photos()[name].read_bytes()
    height, width = image_size(data, name)
    generator = torch.Generator().manual_seed(size)
    n = 24
    top, left, h, w, _ = crop_boxes(
        torch.rand(n, 10, generator=generator),
        torch.rand(n, 10, generator=generator),
        torch.rand(n, generator=generator),
        torch.rand(n, generator=generator),
        height,
        width,
        (0.08, 1.0),
    )
    boxes = torch.stack([top, left, h, w], dim=1).tolist()
    factors = [dct_factor([box], [size]) for box in boxes]
    assert max(factors) >= 4, factors  # the test exercises real reductions
    diffs = []
    for box in boxes:
        reduced = decode_crops(data, [box], size, name)[0].astype(np.float64)
        full = decode_crops(data, [box], size, name, reduce=False)[0].astype(np.float64)
        assert reduced.shape == full.shape == (size, size, 3)
        diffs.append(np.abs(reduced - full).mean())
    assert max(diffs) < CROP_TOLERANCE, diffs
    assert np.mean(diffs) < MEAN_TOLERANCE, diffs


def test_reduced_decode_maps_the_box_to_the_same_place():
    """A crop of a smooth gradient at 1/8 scale lands where the full-scale crop does (no half-block shift)."""
    y, x = np.mgrid[0:512, 0:640]
    image = Image.fromarray(np.stack([x * 255 // 639, y * 255 // 511, (x + y) * 255 // 1150], -1).astype(np.uint8))
    data = encoded(image, "JPEG", quality=95)
    box = (40, 72, 400, 480)
    reduced, full = (decode_crops(data, [box], 48, "g", reduce=r)[0].astype(float) for r in (True, False))
    assert dct_factor([box], [48]) == 8
    assert np.abs(reduced - full).mean() < 1.0


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("LA", "PNG"),
        ("RGB", "WEBP"),
        ("1", "BMP"),
    ],
)
def test_every_mode_reads_as_pil_convert_rgb(mode, fmt):
    base = photo()
    if mode == "I;16":  # a real 16-bit image: levels 0-65535
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    elif mode == "P":
        image = base.quantize(64)
    else:
        image = base.convert(mode)
    data = encoded(image, fmt)
    array, factor = decode(data, "x")
    expected = rgb_of(data)
    assert factor == 1 and array.shape == expected.shape == (120, 160, 3) and array.dtype == np.uint8
    if fmt == "JPEG" and mode == "L":  # simplejpeg vs PIL's libjpeg: the same IDCT, at most a level apart
        assert np.abs(array.astype(int) - expected).max() <= 1
    else:
        np.testing.assert_array_equal(array, expected)


def test_rgb_jpeg_full_decode_matches_pil():
    data = source_photos()["flower"].read_bytes()
    array, _ = decode(data, "flower")
    diff = np.abs(array.astype(int) - rgb_of(data))
    assert diff.mean() < 0.5 and diff.max() <= 2


def test_exif_orientation_is_not_applied_like_torchvision_image_folder():
    """The policy: stored pixels, as PIL + convert("RGB") (torchvision's ImageFolder, the kNN bank, the probes)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(photo(), "JPEG", quality=95, exif=exif.tobytes())
    assert image_size(data, "x") == (120, 160)  # not (160, 120)
    array, _ = decode(data, "x")
    assert array.shape == rgb_of(data).shape == (120, 160, 3)
    assert np.abs(array.astype(int) - rgb_of(data)).max() <= 2


def test_an_image_smaller_than_the_crop_is_upscaled():
    data = encoded(photo().resize((20, 15)), "JPEG")
    crops = decode_crops(data, [(0, 0, 15, 20), (2, 3, 10, 12)], [96, 32], "tiny")
    assert [c.shape for c in crops] == [(96, 96, 3), (32, 32, 3)]
    assert crops[0].std() > 5  # an image, not a blank


def test_bad_files_are_named(tmp_path):
    good = encoded(photo(), "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        decode_crops(read_file(str(truncated)), [(0, 0, 100, 100)], 32, str(truncated))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="junk.png"):
        image_size(read_file(str(junk)), str(junk))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"empty.jpg.*0 bytes"):
        read_file(str(empty))
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        read_file(str(tmp_path / "missing.jpg"))


def random_boxes(height: int, width: int, n: int, seed: int) -> list:
    """n torchvision-distributed RandomResizedCrop boxes (top, left, height, width) of an image."""
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.rand(n, 10, generator=generator) for _ in range(2)]
    draws += [torch.rand(n, generator=generator) for _ in range(2)]
    top, left, h, w, _ = crop_boxes(*draws, height, width, (0.08, 1.0))
    return torch.stack([top, left, h, w], dim=1).tolist()


@pytest.mark.parametrize("name", ["china", "flower", "grace_hopper"])
def test_device_decode_is_within_tolerance_of_full_decode(name):
    """decode_crops_on_device (run here on the CPU, torchvision's decoder) against decode_crops(reduce=False),
    two views of different sizes per image, several images in one batched call."""
    data = source_photos()[name].read_bytes()
    assert device_decodable(data)
    height, width = image_size(data, name)
    boxes = random_boxes(height, width, 12, seed=len(name))
    pairs = [[a, b] for a, b in zip(boxes[:6], boxes[6:])]
    sizes = [48, 24]
    crops = decode_crops_on_device([data] * len(pairs), pairs, sizes, "cpu")
    assert [tuple(c.shape) for c in crops] == [(6, 3, 48, 48), (6, 3, 24, 24)] and crops[0].dtype == torch.uint8
    diffs = []
    for i, pair in enumerate(pairs):
        full = decode_crops(data, pair, sizes, name, reduce=False)
        for v in range(2):
            diffs.append(np.abs(crops[v][i].permute(1, 2, 0).numpy().astype(float) - full[v]).mean())
    assert max(diffs) < CROP_TOLERANCE, diffs
    assert np.mean(diffs) < MEAN_TOLERANCE, diffs


def test_only_whole_ycbcr_and_gray_jpegs_go_to_the_device():
    base = photo()
    assert device_decodable(encoded(base, "JPEG")) and device_decodable(encoded(base.convert("L"), "JPEG"))
    assert device_decodable(encoded(base, "JPEG", progressive=True))  # nvJPEG decodes progressive JPEGs
    assert not device_decodable(encoded(base.convert("CMYK"), "JPEG"))  # nvJPEG has no CMYK / YCCK
    assert not device_decodable(encoded(base, "PNG"))
    assert not device_decodable(encoded(base, "JPEG")[:-500])  # truncated: the worker names it


def test_device_decode_falls_back_for_files_its_decoder_refuses(tmp_path):
    """A file torchvision's decoder refuses fails its whole batched call: the others are decoded one by one and
    the refused one by this process's CPU decoder; an unreadable file is named."""
    jpeg, png = encoded(photo(), "JPEG", quality=95), encoded(photo(), "PNG")
    box = [[(10, 20, 80, 100)]]
    crops = decode_crops_on_device([jpeg, png], box * 2, 32, "cpu", names=["a.jpg", "b.png"])[0]
    expected = [decode_crops(d, box[0], 32, "x", reduce=False)[0] for d in (jpeg, png)]
    for got, want in zip(crops, expected):
        assert np.abs(got.permute(1, 2, 0).numpy().astype(float) - want).mean() < CROP_TOLERANCE
    assert [tuple(c.shape) for c in decode_crops_on_device([], [], [32, 16], "cpu")] == [(0, 3, 32, 32), (0, 3, 16, 16)]
    with pytest.raises(UnreadableImageError, match="junk.jpg"):
        decode_crops_on_device([jpeg, b"\xff\xd8\xff not a jpeg"], box * 2, 32, "cpu", names=["a.jpg", "junk.jpg"])

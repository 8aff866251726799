"""batchssl.views: the batched two-view augmentation against torchvision, its rates, determinism and output."""

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from batchssl.config import Config, build_config
from batchssl.data import INFO, DatasetInfo, sample_seed
from batchssl.errors import UserError
from batchssl.views import (
    DRAWS_PER_VIEW,
    RATIO,
    DeviceViews,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_boxes,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    solarize,
    step_params,
    view_specs,
)

Z = 3.2905  # two-sided normal quantile at 99.9%


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small per-image reference ops: one thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(method="mocov3", **augment) -> Config:
    cfg = Config()
    cfg.method.name = method
    for key, value in augment.items():
        setattr(cfg.augment, key, value)
    return cfg


def smooth_images(n, channels, size, seed=0, levels=256):
    """uint8 images with some structure (ties between channels included: few grey levels when levels is small)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size // 4 + 1, size // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * (levels - 1)).round().mul(255 / (levels - 1)).round().to(torch.uint8)


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n, m, alpha=0.001) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def reference_get_params(u_area, u_logr, u_top, u_left, height, width, scale, ratio=RATIO):
    """torchvision's RandomResizedCrop.get_params loop, one sample, fed with the given uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for ua, ur in zip(u_area, u_logr):
        target = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------------------- 1. crop sampler

# A wide input and a scale range that makes many attempts too tall: the central fallback happens sometimes.
H, W, SCALE = 24, 64, (0.3, 1.0)


def test_crop_sampler_follows_torchvision_loop_exactly():
    g = torch.Generator().manual_seed(1)
    n = 3000
    ua, ur, ut, ul = (
        torch.rand(n, 10, generator=g, dtype=torch.float64),
        torch.rand(n, 10, generator=g, dtype=torch.float64),
        torch.rand(n, generator=g, dtype=torch.float64),
        torch.rand(n, generator=g, dtype=torch.float64),
    )
    top, left, h, w, fallback = crop_boxes(ua, ur, ut, ul, H, W, SCALE)
    ours = torch.stack([top, left, h, w], 1).tolist()
    ref = [
        reference_get_params(ua[i].tolist(), ur[i].tolist(), float(ut[i]), float(ul[i]), H, W, SCALE) for i in range(n)
    ]
    assert ours == [list(r) for r in ref]
    assert 0 < int(fallback.sum()) < n


def test_crop_sampler_with_a_size_per_sample_follows_torchvision_loop():
    """Files differ in size: every sample its own height and width (tall, wide, square, tiny), fallback included."""
    g = torch.Generator().manual_seed(11)
    n = 2000
    heights = torch.randint(1, 90, (n,), generator=g)
    widths = torch.randint(1, 90, (n,), generator=g)
    heights[:4], widths[:4] = torch.tensor([24, 64, 1, 7]), torch.tensor([64, 24, 1, 7])
    ua, ur = torch.rand(n, 10, generator=g, dtype=torch.float64), torch.rand(n, 10, generator=g, dtype=torch.float64)
    ut, ul = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    top, left, h, w, fallback = crop_boxes(ua, ur, ut, ul, heights, widths, SCALE)
    ref = [
        reference_get_params(
            ua[i].tolist(), ur[i].tolist(), float(ut[i]), float(ul[i]), int(heights[i]), int(widths[i]), SCALE
        )
        for i in range(n)
    ]
    assert torch.stack([top, left, h, w], 1).tolist() == [list(r) for r in ref]
    assert 0 < int(fallback.sum()) < n
    assert ((top + h <= heights) & (left + w <= widths) & (h >= 1) & (w >= 1)).all()


def test_crop_distribution_matches_torchvision_ks():
    n = 20000
    g = torch.Generator().manual_seed(2)
    top, left, h, w, fallback = crop_boxes(
        torch.rand(n, 10, generator=g),
        torch.rand(n, 10, generator=g),
        torch.rand(n, generator=g),
        torch.rand(n, generator=g),
        H,
        W,
        SCALE,
    )
    assert fallback.float().mean() > 0.005, "the fallback branch must be exercised"
    image = torch.zeros(1, H, W)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = torch.tensor([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)])
    rt, rl, rh, rw = ref.unbind(1)
    crit = ks_critical(n, n)
    for ours, theirs in [
        ((h * w) / (H * W), (rh * rw) / (H * W)),
        ((w / h).log(), (rw / rh).log()),
        (top, rt),
        (left, rl),
    ]:
        assert ks_statistic(ours, theirs) < crit
    # torchvision's fallback box (h = 24, w = 32, central) is as frequent in both.
    fb = (H, round(H * 4 / 3))
    p_ours = ((h == fb[0]) & (w == fb[1]) & (left == (W - fb[1]) // 2)).double().mean().item()
    p_ref = ((rh == fb[0]) & (rw == fb[1]) & (rl == (W - fb[1]) // 2)).double().mean().item()
    pooled = (p_ours + p_ref) / 2
    assert abs(p_ours - p_ref) < Z * math.sqrt(2 * pooled * (1 - pooled) / n)


# -------------------------------------------------------------------------------------------------- 2. rates


def assert_rate(mask: torch.Tensor, p: float):
    n = mask.numel()
    rate = mask.double().mean().item()
    if p in (0.0, 1.0):
        assert rate == p
    else:
        assert abs(rate - p) < Z * math.sqrt(p * (1 - p) / n), (rate, p)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("simsiam", [dict(blur=0.5, solarize=0.0), dict(blur=0.5, solarize=0.0)]),
        ("mocov3", [dict(blur=1.0, solarize=0.0), dict(blur=0.1, solarize=0.2)]),
    ],
)
def test_rates_match_presets(method, expected):
    info = INFO["stl10"]  # 96 px: blur on
    views = DeviceViews(make_cfg(method), info)
    n = 20000
    params = views.params(0, 0, 0, 96, 96, global_batch=n)
    sat = 0.4 if method == "simsiam" else 0.2
    for p, exp in zip(params, expected):
        assert_rate(p.flip, 0.5)
        assert_rate(p.jitter, 0.8)
        assert_rate(p.gray, 0.2)
        assert_rate(p.blur, exp["blur"])
        assert_rate(p.solarize, exp["solarize"])
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (1 - sat, 1 + sat), (-0.1, 0.1)]):
            f = p.factors[:, k]
            assert lo - 1e-6 <= f.min() and f.max() <= hi + 1e-6 and f.max() - f.min() > 0.95 * (hi - lo)
            assert_rate(f < (lo + hi) / 2, 0.5)
        s0, s1 = 0.1 * 96 / 224, 2.0 * 96 / 224
        assert s0 - 1e-6 <= p.sigma.min() and p.sigma.max() <= s1 + 1e-6
        # Every op is first in a quarter of the samples; orders are permutations.
        assert (p.order.sort(dim=1).values == torch.arange(4)).all()
        for k in range(4):
            assert_rate(p.order[:, 0] == k, 0.25)
        scale = (p.height * p.width) / 96**2
        min_scale = 0.2 if method == "simsiam" else 0.08
        assert scale.min() >= min_scale - 0.02 and scale.max() <= 1.0


def test_small_and_grayscale_datasets():
    views = DeviceViews(make_cfg("mocov3"), INFO["fashion_mnist"])
    params = views.params(0, 0, 0, 28, 28, global_batch=5000)
    for p in params:
        assert_rate(p.gray, 0.0)
        assert_rate(p.blur, 0.0)  # < 64 px: no blur
        assert (p.factors[:, 2] == 1).all() and (p.factors[:, 3] == 0).all()  # no saturation / hue
    assert_rate(params[1].solarize, 0.2)
    specs = view_specs(make_cfg("mocov3", solarize=False, color_jitter=0.0, blur=True), INFO["cifar10"])
    assert specs[1].solarize == 0 and specs[0].jitter == 0 and specs[0].blur == 1.0
    assert specs[0].sigmas == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))


# ----------------------------------------------------------------------------- 3. ops against torchvision


def test_resized_crop_matches_torchvision():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 3, 30, 50, generator=g)
    h = torch.randint(1, 31, (40,), generator=g)
    w = torch.randint(1, 51, (40,), generator=g)
    h[:3], w[:3] = torch.tensor([30, 1, 30]), torch.tensor([50, 1, 2])  # whole image, one pixel, a sliver
    top = (torch.rand(40, generator=g) * (30 - h + 1)).long()
    left = (torch.rand(40, generator=g) * (50 - w + 1)).long()
    flip = torch.rand(40, generator=g) < 0.5
    for size in (32, 17):  # upsampling and (for large boxes) downsampling
        ours = resized_crop(x, top, left, h, w, flip, size)
        for b in range(40):
            ref = TF.resized_crop(
                x[b],
                int(top[b]),
                int(left[b]),
                int(h[b]),
                int(w[b]),
                [size, size],
                interpolation=TF.InterpolationMode.BILINEAR,
                antialias=False,
            )
            if flip[b]:
                ref = TF.horizontal_flip(ref)
            torch.testing.assert_close(ours[b], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_ops_match_torchvision(channels):
    g = torch.Generator().manual_seed(5)
    # Few grey levels: ties between channels and grey pixels, where hue is most delicate.
    x = torch.cat([smooth_images(16, channels, 20, levels=8), smooth_images(16, channels, 20, seed=1)]).float() / 255
    n = len(x)
    factors = {
        "brightness": torch.rand(n, generator=g) * 1.6,
        "contrast": torch.rand(n, generator=g) * 1.6,
        "saturation": torch.rand(n, generator=g) * 1.6,
        "hue": torch.rand(n, generator=g) - 0.5,
    }
    ours_fns = dict(
        brightness=adjust_brightness, contrast=adjust_contrast, saturation=adjust_saturation, hue=adjust_hue
    )
    tv_fns = dict(
        brightness=TF.adjust_brightness, contrast=TF.adjust_contrast, saturation=TF.adjust_saturation, hue=TF.adjust_hue
    )
    for name, f in factors.items():
        ours = ours_fns[name](x, f)
        ref = torch.stack([tv_fns[name](x[b], float(f[b])) for b in range(n)])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=name)
        inplace = x.clone()
        ours_fns[name](inplace, f, inplace=True)
        torch.testing.assert_close(inplace, ref, atol=1e-5, rtol=0, msg=f"{name} in place")
    if channels == 3:
        torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_blur_and_solarize_match_torchvision():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(12, 3, 24, 24, generator=g)
    sigma = torch.rand(12, generator=g) * 2 + 0.05
    for k in (3, 7, 13):
        ours = gaussian_blur(x, sigma, k)
        ref = torch.stack([TF.gaussian_blur(x[b], [k, k], [float(sigma[b])] * 2) for b in range(12)])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    mask = torch.rand(12, generator=g) < 0.5
    ref = torch.stack([TF.solarize(x[b], 128 / 255) if mask[b] else x[b] for b in range(12)])
    assert torch.equal(solarize(x, mask), ref)
    # lightly's PIL solarize on uint8 values: >= 128 inverted.
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, -1) / 255
    out = solarize(levels, torch.tensor([True])).view(-1) * 255
    expected = torch.tensor([v if v < 128 else 255 - v for v in range(256)], dtype=torch.float32)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def reference_view(x, p, b, kernel_size, info):
    """One sample's view with torchvision's functional ops and the drawn parameters."""
    y = TF.resized_crop(
        x, int(p.top[b]), int(p.left[b]), int(p.height[b]), int(p.width[b]), [info.image_size] * 2, antialias=False
    )
    if p.flip[b]:
        y = TF.horizontal_flip(y)
    if p.jitter[b]:
        fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in p.order[b].tolist():
            y = fns[op](y, float(p.factors[b, op]))
    if p.gray[b]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p.blur[b]:
        y = TF.gaussian_blur(y, [kernel_size] * 2, [float(p.sigma[b])] * 2)
    if p.solarize[b]:
        y = TF.solarize(y, 128 / 255)
    return TF.normalize(y, list(info.mean), list(info.std))


@pytest.mark.parametrize("method", ["mocov3", "simsiam"])
def test_views_match_torchvision_pipeline(method):
    info = DatasetInfo(10, 3, 64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # 64 px: blur on
    views = DeviceViews(make_cfg(method), info)
    images = smooth_images(48, 3, 64, seed=7)
    params = views.params(1, 2, 3, 64, 64, global_batch=48)
    out = views.render(images, params)
    x = images.float() / 255
    for v in range(2):
        ref = torch.stack([reference_view(x[b], params[v], b, views.kernel_sizes[v], info) for b in range(48)])
        err = (out[v] - ref).abs()
        # Solarisation / clamping thresholds may flip on float rounding for a pixel or two; all else is close.
        assert (err > 1e-4).float().mean() < 1e-4, err.max()
    assert sum(int(p.jitter.sum()) for p in params) > 50 and int(params[0].blur.sum()) > 10


# -------------------------------------------------------------------------------------------- 4. determinism


def test_determinism_processes_and_global_rng():
    info = INFO["cifar10"]
    views = DeviceViews(make_cfg("mocov3", blur=True), info, global_batch=32)
    images = smooth_images(32, 3, 32, seed=8)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = views(images, seed=0, epoch=1, step=5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state and np.random.get_state()[1].tolist() == np_state[1].tolist()
    b = views(images, seed=0, epoch=1, step=5)
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    c = views(images, seed=0, epoch=1, step=6)
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])
    # Two processes, each with its rows of the global batch: the same parameters, the same views.
    full = views.params(0, 1, 5, 32, 32, global_batch=32)
    for rank in range(2):
        positions = torch.arange(rank, 32, 2)
        part = views(images[positions], seed=0, epoch=1, step=5, positions=positions)
        half = views.params(0, 1, 5, 32, 32, positions=positions)
        for v in range(2):
            for name in (
                "top",
                "left",
                "height",
                "width",
                "flip",
                "jitter",
                "order",
                "factors",
                "gray",
                "blur",
                "sigma",
                "solarize",
            ):
                assert torch.equal(getattr(half[v], name), getattr(full[v], name)[positions]), name
            torch.testing.assert_close(part[v], a[v][positions], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        views(images[:4], 0, 1, 5, positions=torch.tensor([0, 1, 2, 40]))


# ----------------------------------------------------------------------------------------------- 5. output


def test_output_format_and_normalisation():
    info = INFO["fashion_mnist"]
    # Fashion-MNIST-like pixel statistics (mostly dark, bright patches), the same everywhere in the image so
    # that crops keep them.
    field = smooth_images(256, 1, 28, seed=9).float() / 255
    texture = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(10))
    images = torch.where(field > 0.55, 0.35 + 0.6 * texture, torch.zeros(())).mul(255).round().to(torch.uint8)
    raw = (images.float() / 255 - info.mean[0]) / info.std[0]
    views = DeviceViews(make_cfg("mocov3"), info)
    out = views(images, seed=0, epoch=0, step=0)
    assert len(out) == 2
    for v in out:
        assert v.dtype == torch.float32 and v.shape == (256, 1, 28, 28)
        assert v.is_contiguous(memory_format=torch.channels_last)
        unnormalised = v * info.std[0] + info.mean[0]
        assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5
        assert abs(v.mean() - raw.mean()) < 0.2 and 0.75 < v.std() / raw.std() < 1.25
    # Nothing random left: the views are the normalised images.
    still = DeviceViews(make_cfg("mocov3", color_jitter=0.0, hflip=0.0, min_scale=1.0, solarize=False), info)
    for v in still(images, seed=0, epoch=0, step=0):
        torch.testing.assert_close(v, raw, atol=1e-5, rtol=0)
    rgb = DeviceViews(make_cfg("simsiam"), INFO["cifar10"])(smooth_images(8, 3, 32), 0, 0, 0)
    assert rgb[0].shape == (8, 3, 32, 32) and rgb[1].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ 6. two views as before the spec


def test_two_view_draws_are_the_pre_spec_layout():
    """The recipes' views before views became a spec: a (B, 2, 36) block of float64 uniforms per step from a
    generator seeded by sample_seed(seed, epoch, step); per view, columns 0-9 crop areas, 10-19 log-ratios, then
    top, left, flip, jitter, 4 for the op order, 4 factors, gray, blur, sigma, solarise. The same seeds must give
    the same parameters, hence the same views and losses."""
    info = INFO["stl10"]
    s0, s1 = 0.1 * 96 / 224, 2.0 * 96 / 224
    for method in ("mocov3", "simsiam"):
        views = DeviceViews(make_cfg(method), info)
        params = views.params(7, 3, 11, 96, 96, global_batch=64)
        u = torch.rand(64, 2, 36, generator=torch.Generator().manual_seed(sample_seed(7, 3, 11)), dtype=torch.float64)
        assert DRAWS_PER_VIEW == 36 and len(params) == 2
        blur, solar = {"mocov3": ((1.0, 0.1), (0.0, 0.2)), "simsiam": ((0.5, 0.5), (0.0, 0.0))}[method]
        sat = 0.4 if method == "simsiam" else 0.2
        scale = (0.08 if method == "mocov3" else 0.2, 1.0)
        for v, p in enumerate(params):
            x = u[:, v]
            boxes = [
                reference_get_params(
                    x[b, :10].tolist(), x[b, 10:20].tolist(), float(x[b, 20]), float(x[b, 21]), 96, 96, scale
                )
                for b in range(64)
            ]
            assert torch.stack([p.top, p.left, p.height, p.width], 1).tolist() == [list(r) for r in boxes]
            assert torch.equal(p.flip, x[:, 22] < 0.5) and torch.equal(p.jitter, x[:, 23] < 0.8)
            assert torch.equal(p.order, x[:, 24:28].argsort(dim=1))
            lo = torch.tensor([0.6, 0.6, 1 - sat, -0.1], dtype=torch.float64)
            hi = torch.tensor([1.4, 1.4, 1 + sat, 0.1], dtype=torch.float64)
            torch.testing.assert_close(p.factors, (lo + (hi - lo) * x[:, 28:32]).float(), atol=1e-6, rtol=0)
            assert torch.equal(p.gray, x[:, 32] < 0.2) and torch.equal(p.blur, x[:, 33] < blur[v])
            torch.testing.assert_close(p.sigma, (s0 + (s1 - s0) * x[:, 34]).float(), atol=1e-6, rtol=0)
            assert torch.equal(p.solarize, x[:, 35] < solar[v])


# -------------------------------------------------------------------------------- 7. local crops, file entries


def test_local_crops_spec_sizes_and_output():
    cfg = make_cfg("simsiam", local_crops=2)
    specs = view_specs(cfg, INFO["fashion_mnist"])
    assert [s.size for s in specs] == [28, 28, 12, 12] and specs[2].scale == (0.05, 0.4)
    assert specs[2] == specs[3] and specs[2].solarize == 0 and specs[2].jitter == specs[0].jitter
    assert [s.size for s in view_specs(make_cfg(local_crops=1), INFO["stl10"])] == [96, 96, 40]
    assert view_specs(make_cfg(local_crops=1, local_size=16), INFO["cifar10"])[2].size == 16
    assert view_specs(make_cfg("mocov3", local_crops=1, blur=True), INFO["cifar10"])[2].blur == 0.5
    views = DeviceViews(cfg, INFO["fashion_mnist"])
    out = views(smooth_images(16, 1, 28, seed=12), seed=0, epoch=0, step=0)
    assert [tuple(v.shape) for v in out] == [(16, 1, 28, 28)] * 2 + [(16, 1, 12, 12)] * 2
    # Local crops cover 5-40 % of the image (rounding aside), global ones 20-100 %.
    params = views.params(0, 0, 0, 28, 28, global_batch=4000)
    area = [(p.height * p.width).double() / 28**2 for p in params]
    assert area[2].min() >= 0.03 and area[2].max() <= 0.45 and area[0].min() >= 0.18
    assert not torch.equal(params[2].top, params[3].top)  # each view its own draws


def test_local_crops_config_is_checked():
    base = {"augment": {}}
    with pytest.raises(UserError, match="local_crops"):
        build_config({"augment": {"local_crops": -1}})
    with pytest.raises(UserError, match="local_scale"):
        build_config({"augment": {"local_scale": [0.5, 0.2]}})
    with pytest.raises(UserError, match="local_size"):
        build_config({"augment": {"local_size": 4}})
    assert build_config(base).augment.local_crops == 0
    vit = make_cfg("mocov3", local_crops=2)
    vit.model.arch = "vit_tiny"
    with pytest.raises(UserError, match="local_size=32"):
        view_specs(vit, INFO["cifar10"])
    vit.augment.local_size = 32
    assert [s.size for s in view_specs(vit, INFO["cifar10"])] == [32] * 4


def test_memory_format_follows_the_trainer():
    info, images = INFO["cifar10"], smooth_images(4, 3, 32)
    cfg = make_cfg("mocov3")
    assert DeviceViews(cfg, info)(images, 0, 0, 0)[0].is_contiguous(memory_format=torch.channels_last)
    for key, value in (("channels_last", False), ("arch", "vit_tiny")):
        cfg = make_cfg("mocov3")
        setattr(cfg.train if key == "channels_last" else cfg.model, key, value)
        out = DeviceViews(cfg, info)(images, 0, 0, 0)
        assert all(v.is_contiguous() for v in out), key


def test_step_params_for_one_position_of_an_image_of_its_own_size():
    """A loader worker's view of one sample equals the device's for the same (seed, epoch, step, position)."""
    cfg = make_cfg("mocov3", local_crops=2)
    views = DeviceViews(cfg, INFO["cifar10"], global_batch=8)
    heights, widths = torch.tensor([40, 300, 32, 7, 90, 64, 33, 500]), torch.tensor([50, 200, 32, 9, 30, 64, 99, 375])
    batch = views.params(1, 2, 3, heights, widths, global_batch=8)
    for position in (0, 3, 7):
        one = step_params(views.specs, 1, 2, 3, 8, position, int(heights[position]), int(widths[position]))
        assert len(one) == 4
        for v in range(4):
            for name, value in vars(one[v]).items():
                assert torch.equal(value, getattr(batch[v], name)[position : position + 1]), (v, name)
    with pytest.raises(ValueError):
        step_params(views.specs, 1, 2, 3, 8, 8, 32, 32)


def test_render_crops_equals_render_from_whole_images():
    """Crops cut (unflipped) and resized beforehand, then render_crops: the same views as render does."""
    info = DatasetInfo(10, 3, 64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    views = DeviceViews(make_cfg("mocov3", local_crops=1), info)
    images = smooth_images(24, 3, 64, seed=13)
    params = views.params(0, 1, 2, 64, 64, global_batch=24)
    x = images.float() / 255
    crops = [
        resized_crop(x, p.top, p.left, p.height, p.width, torch.zeros(24, dtype=torch.bool), spec.size)
        for p, spec in zip(params, views.specs)
    ]
    for a, b in zip(views.render(images, params), views.render_crops(crops, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert int(params[0].flip.sum()) > 0 and int(params[0].jitter.sum()) > 0
    uint8 = [c.mul(255).round().to(torch.uint8) for c in crops]  # what a loader worker sends
    assert [tuple(v.shape) for v in views.render_crops(uint8, params)] == [(24, 3, 64, 64)] * 2 + [(24, 3, 28, 28)]
    with pytest.raises(ValueError, match="spec says"):
        views.render_crops([uint8[0], uint8[1], uint8[0]], params)


def test_worker_transforms_are_built_from_the_same_specs():
    """augment.view_transforms (the data.pipeline=workers chain) reads view_specs: sizes, crop, probabilities."""
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.solarize import RandomSolarization
    from PIL import Image

    from batchssl.augment import view_transforms

    cfg, info = make_cfg("mocov3", local_crops=1), INFO["stl10"]
    specs = view_specs(cfg, info)
    transforms = view_transforms(cfg, info)
    assert len(transforms) == len(specs) == 3
    for spec, chain in zip(specs, transforms):
        crop, flip, jitter, gray, *rest = chain.transforms
        assert list(crop.size) == [spec.size] * 2 and tuple(crop.scale) == spec.scale and crop.ratio == spec.ratio
        assert flip.p == spec.hflip and jitter.p == spec.jitter and gray.p == spec.gray
        cj = jitter.transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == spec.jitter_ranges
        blur = [t for t in rest if isinstance(t, GaussianBlur)]
        solar = [t for t in rest if isinstance(t, RandomSolarization)]
        assert [b.prob for b in blur] == ([spec.blur] if spec.blur else [])
        assert all(b.sigmas == spec.sigmas for b in blur)
        assert [s.prob for s in solar] == ([spec.solarize] if spec.solarize else [])
    image = Image.fromarray(smooth_images(1, 3, 96)[0].permute(1, 2, 0).numpy())
    assert [tuple(t(image).shape) for t in transforms] == [(3, 96, 96), (3, 96, 96), (3, 40, 40)]
    # Grayscale data: saturation and hue off, as on the device.
    gray = view_transforms(make_cfg("simsiam"), INFO["fashion_mnist"])[0].transforms[2].transforms[0]
    assert gray.saturation is None and gray.hue is None


@pytest.mark.parametrize(
    "method, preset",
    [
        ("mocov3", "byol"),
        ("byol", "byol"),
        ("barlowtwins", "byol"),
        ("vicreg", "byol"),
        ("dino", "byol"),
        ("simsiam", "simsiam"),
        ("simclr", "simsiam"),
    ],
)
def test_auto_preset_is_the_methods_paper_augmentation(method, preset):
    from batchssl.views import preset_for

    assert preset_for(build_config({"method": {"name": method}})) == preset
    assert preset_for(build_config({"method": {"name": method}, "augment": {"preset": "simsiam"}})) == "simsiam"


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny", "timm:resnet18"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_views_follow_the_models_memory_format(arch, channels_last):
    from batchssl.build import uses_channels_last
    from batchssl.views import trainer_memory_format

    cfg = build_config({"model": {"arch": arch}, "train": {"channels_last": channels_last}})
    expected = torch.channels_last if uses_channels_last(cfg) else torch.contiguous_format
    assert trainer_memory_format(cfg) == expected
    assert uses_channels_last(cfg) == (channels_last and arch != "vit_tiny")

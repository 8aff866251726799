"""Loader speed on a folder of real photos: two-view pairs per second per loader core, side by side.

  lightly   data.pipeline=workers: data.TwoViews over the ImageFolder (PIL full decode + convert("RGB"), then the
            two lightly / torchvision view transforms: crop, flip, jitter, grayscale, blur, solarise, normalise)
  split     data.pipeline=split, the loader worker's part: read, decode once at reduced DCT scale (simplejpeg),
            cut and resize both crops (batchssl.filepipeline.StepCrops); the device's part (flip, colour ops,
            blur, normalisation) is timed separately on the CPU ("split device", per pair, batched)
  split-full  the same worker part with every image decoded at full scale (what reduced-scale decoding saves)
  decoders  --decoders: decode-only images/s of the folder at full scale and at 1/2, 1/4: PIL (draft),
            simplejpeg, and PyTurboJPEG when it is installed with a libjpeg-turbo it accepts

--train instead times pretrain.py end to end (median images/s of its logged intervals) with data.pipeline=split
and data.pipeline=workers, a ResNet-18 at width 0.25 so that the loader is the bottleneck.

--decode cpu gpu instead times the split pipeline as the trainer consumes it, with no model: pairs/s of finished
views on the training device (CUDA when there is one) from --workers loader workers, per data.decode setting
(cpu: workers decode and crop; gpu: workers only read and draw boxes, the device decodes with nvJPEG); the median
of --repeats epochs after a warm-up epoch, ratio = gpu / cpu.

Everything else runs in this process on one core (torch.set_num_threads(1)), as one DataLoader worker runs it; each
figure is the median of --repeats interleaved runs, so a busy machine slows all alike; ratio = split / lightly.

    python benchmarks/make_photo_folder.py /tmp/photos --train 300 --val 30
    python benchmarks/loader_speed.py /tmp/photos                  # 96, 160, 224 px, MoCo v3 (BYOL) views
    python benchmarks/loader_speed.py /tmp/photos --sizes 224 --images 64 --repeats 3 --decoders
    python benchmarks/loader_speed.py /tmp/photos --train --sizes 96 --repeats 1   # the trainer, end to end
    python benchmarks/loader_speed.py /tmp/photos --decode cpu gpu --sizes 224 --workers 8 --batch 128  # on a GPU
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl"))

from batchssl.augment import view_transforms
from batchssl.config import load_config
from batchssl.data import TwoViews, dataset_info, pretrain_dataset
from batchssl.errors import UserError
from batchssl.filepipeline import StepCrops, build_split_pipeline, image_folder_source
from batchssl.views import DeviceViews

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "imagenet" / "mocov3_r50.yaml"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loader_rates(root: str, size: int, images: int, repeats: int, method: str) -> dict[str, float]:
    """Pairs/s of each path at `size` px over the first `images` of one epoch's order."""
    cfg = load_config(
        RECIPE, [f"data.root={root}", f"data.image_size={size}", f"train.batch_size={images}", f"method.name={method}"]
    )
    info = dataset_info(cfg.data)
    workers = TwoViews(pretrain_dataset(cfg.data), view_transforms(cfg, info), cfg.seed)
    device = DeviceViews(cfg, info, global_batch=images)
    positions = torch.arange(images)
    split = StepCrops(image_folder_source(cfg), device.specs, cfg.seed, images, positions)
    full = StepCrops(split.source, device.specs, cfg.seed, images, positions, reduce=False)
    rows = split.rows(0, 0).tolist()
    crops, _ = split[(0, 0)]
    crops = [c.permute(0, 3, 1, 2) for c in crops]
    params = device.params(cfg.seed, 0, 0, 1, 1, positions, images)
    runs = {
        "lightly": lambda: [workers[(0, r)] for r in rows],
        "split": lambda: split[(0, 0)],
        "split-full": lambda: full[(0, 0)],
        "split device": lambda: device.render_crops(crops, params),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    return {name: images / statistics.median(t) for name, t in times.items()}


def decoder_rates(root: str, images: int, repeats: int) -> dict[str, float]:
    from PIL import Image

    files = sorted(Path(root, "train").rglob("*.jpg"))[:images]
    datas = [f.read_bytes() for f in files]

    def pil(data: bytes, k: int):
        image = Image.open(io.BytesIO(data))
        if k > 1:
            image.draft("RGB", (image.width // k, image.height // k))
        return np.asarray(image.convert("RGB"))

    def simple(data: bytes, k: int):
        import simplejpeg

        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(data, min_height=-(-h // k), min_width=-(-w // k), min_factor=k)

    decoders = {"PIL (draft)": pil, "simplejpeg": simple}
    try:
        from turbojpeg import TurboJPEG

        turbo = TurboJPEG()
        decoders["PyTurboJPEG"] = lambda data, k: turbo.decode(data, scaling_factor=(1, k) if k > 1 else None)
    except Exception as err:  # not installed, or no libjpeg-turbo it accepts
        print(f"PyTurboJPEG skipped: {str(err).splitlines()[0]}")
    rates = {}
    for k in (1, 2, 4):
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(repeats):
            for name, fn in decoders.items():
                times[name].append(timed(lambda fn=fn, k=k: [fn(d, k) for d in datas]))
        for name, t in times.items():
            rates[f"{name} 1/{k}"] = len(datas) / statistics.median(t)
    return rates


def train_rates(root: str, size: int, epochs: int, workers: int, repeats: int) -> dict[str, float]:
    """Median images/s of pretrain.py runs (a backbone small enough to be loader-bound) per data.pipeline."""
    import json
    import subprocess
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    rates: dict[str, list[float]] = {"split": [], "workers": []}
    for _ in range(repeats):
        for pipeline in rates:
            with tempfile.TemporaryDirectory() as out:
                argv = [
                    "pretrain.py",
                    "--config",
                    str(RECIPE),
                    f"data.root={root}",
                    f"data.image_size={size}",
                    f"data.pipeline={pipeline}",
                    f"data.num_workers={workers}",
                    "model.arch=resnet18",
                    "model.width=0.25",
                    "train.batch_size=32",
                    f"train.epochs={epochs}",
                    "train.log_every_n_steps=2",
                    "monitor.enabled=false",
                    "optim.warmup_epochs=0",
                    "checkpoint.every_n_epochs=1000",
                    f"output_dir={out}",
                ]
                result = subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"pretrain.py (data.pipeline={pipeline}) failed:\n{result.stderr[-3000:]}")
                lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
                speeds = [m["images_per_s"] for m in lines if "images_per_s" in m][1:]  # the first: start-up
                rates[pipeline].append(statistics.median(speeds))
    return {name: statistics.median(r) for name, r in rates.items()}


def device_rates(root: str, size: int, decodes: list[str], workers: int, batch: int, repeats: int) -> dict:
    """Pairs/s of finished views on the training device per data.decode (split pipeline, no model): per setting,
    one warm-up epoch, then the median over `repeats` epochs of (steps - 1) * batch / (last - first batch's
    arrival), so worker start-up and the first fill of the queue are not counted."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {}
    for decode in decodes:
        overrides = [f"data.root={root}", f"data.image_size={size}", f"train.batch_size={batch}"]
        cfg = load_config(RECIPE, [*overrides, f"data.num_workers={workers}", f"data.decode={decode}"])
        try:
            pipeline = build_split_pipeline(cfg, dataset_info(cfg.data), device)
        except UserError as err:  # data.decode=gpu without CUDA
            raise SystemExit(f"loader_speed.py: {err}") from None
        if pipeline.steps_per_epoch < 3:
            raise SystemExit(f"{root}: {pipeline.steps_per_epoch} steps of {batch} per epoch; --decode needs >= 3")
        per_epoch = []
        for epoch in range(repeats + 1):
            arrivals = []
            for _ in pipeline.batches(epoch):
                sync()  # the views are made: the device part is counted
                arrivals.append(time.perf_counter())
            if epoch > 0:
                per_epoch.append((len(arrivals) - 1) * batch / (arrivals[-1] - arrivals[0]))
        rates[decode] = statistics.median(per_epoch)
        del pipeline
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="an ImageFolder root (train/<class>/*.jpg), e.g. from make_photo_folder.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    parser.add_argument("--images", type=int, default=128, help="images per timed run (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="mocov3", choices=["mocov3", "simsiam"])
    parser.add_argument("--decoders", action="store_true", help="also time each JPEG decoder alone")
    parser.add_argument(
        "--train",
        action="store_true",
        help="only the trainer's images/s end to end, per pipeline "
        "(pretrain.py, ResNet-18 x0.25, batch 32, --workers loader workers)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        choices=["cpu", "gpu"],
        help="only the split pipeline's pairs/s on the training device, per data.decode setting (no model)",
    )
    parser.add_argument("--batch", type=int, default=128, help="--decode: the batch size (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="--train, --decode: loader workers (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="--train: epochs per run (default 2)")
    args = parser.parse_args()
    if args.train:
        print(f"pretrain.py median images/s, {args.workers} loader workers, median of {args.repeats} runs each")
        for size in args.sizes:
            r = train_rates(args.root, size, args.epochs, args.workers, args.repeats)
            print(
                f"{size:4d} px  workers (lightly) {r['workers']:7.1f}  split {r['split']:7.1f}  "
                f"ratio {r['split'] / r['workers']:5.2f}"
            )
        return
    if args.decode:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if "gpu" in args.decode and device == "cpu":
            raise SystemExit("loader_speed.py: --decode gpu needs a CUDA GPU (none found); --decode cpu runs here")
        print(
            f"split pipeline on {device}, no model: pairs/s of finished views, {args.workers} loader workers, "
            f"batch {args.batch}, median of {args.repeats} epochs"
        )
        for size in args.sizes:
            r = device_rates(args.root, size, args.decode, args.workers, args.batch, args.repeats)
            ratio = f"  ratio gpu/cpu {r['gpu'] / r['cpu']:5.2f}" if {"cpu", "gpu"} <= r.keys() else ""
            print(f"{size:4d} px  " + "  ".join(f"decode={k} {v:8.1f}" for k, v in r.items()) + ratio)
        return
    torch.set_num_threads(1)
    print(f"pairs/s on one core, median of {args.repeats}; {args.images} images of {args.root}, {args.method} views")
    for size in args.sizes:
        r = loader_rates(args.root, size, args.images, args.repeats, args.method)
        print(
            f"{size:4d} px  lightly {r['lightly']:7.1f}  split {r['split']:7.1f}  split-full {r['split-full']:7.1f}"
            f"  ratio split/lightly {r['split'] / r['lightly']:5.2f}  (split device part on the CPU: "
            f"{r['split device']:7.1f} pairs/s)"
        )
    if args.decoders:
        print("decode only, images/s on one core:")
        for name, rate in decoder_rates(args.root, args.images, args.repeats).items():
            print(f"  {name:20s} {rate:7.1f}")


if __name__ == "__main__":
    main()

"""Shards against the folder they came from: images read per second, and the split pipeline's worker part (read,
decode at reduced scale, cut both crops) in pairs per second, side by side on one core.

  folder   data.name=imagefolder: one file per image, opened and read in the epoch's random order
           (filepipeline.FileSource, the order StepCrops gives a process)
  shards   data.name=shards: the same images converted by `python -m batchssl.shards` (--shard-size, default
           100 here), read front to back through the seeded shuffle buffer (shards.ShardStream)

Each run is one epoch of --images images (default: all of them, an epoch's worth: the stream's shuffle buffer
reads data.shuffle_buffer images before it gives the first, which only a whole epoch amortises as training does).
`read` times only getting the bytes; `crops` times what a loader worker does for them (the
step's crops at --size px from the same (seed, epoch, step) draws). With --cold every file of both layouts is
dropped from the page cache (posix_fadvise DONTNEED) before each timed run, so the reads come from the disk; without
it both read from memory. Each figure is the median of --repeats interleaved runs on one core
(torch.set_num_threads(1), as one loader worker); ratio = shards / folder.

    python benchmarks/make_photo_folder.py /tmp/photos --train 600 --val 60
    python benchmarks/shard_speed.py /tmp/photos --repeats 5
    python benchmarks/shard_speed.py /tmp/photos --repeats 5 --cold
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl"))

from batchssl.config import load_config
from batchssl.data import dataset_info
from batchssl.filepipeline import StepCrops, image_folder_source
from batchssl.shards import ShardStream, convert
from batchssl.views import view_specs

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "imagenet" / "mocov3_r50.yaml"


def drop_from_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages (no privileges needed), so the next read goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="an ImageFolder root (train/<class>/*.jpg), e.g. from make_photo_folder.py")
    parser.add_argument("--shards", help="the converted shards (default: ROOT_shards, converted if missing)")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--images", type=int, help="images per timed run (default: one epoch of the folder)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop both layouts from the page cache before each run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shard_root = Path(args.shards or str(Path(args.root).resolve()) + "_shards")
    if not (shard_root / "shards.json").is_file():
        convert(args.root, shard_root, args.shard_size)

    batch = 64
    cfg = load_config(RECIPE, [f"data.root={args.root}", f"data.image_size={args.size}", f"train.batch_size={batch}"])
    source = image_folder_source(cfg)
    stream = ShardStream(shard_root, cfg.seed, batch, buffer=cfg.data.shuffle_buffer)
    steps = min(len(source) // batch, stream.steps_per_epoch) if args.images is None else args.images // batch
    if steps > min(len(source) // batch, stream.steps_per_epoch):
        raise SystemExit(f"--images {args.images}: the folder has {len(source)} training images; make it larger")
    specs = view_specs(cfg, dataset_info(cfg.data))
    crops = StepCrops(source, specs, cfg.seed, batch, torch.arange(batch))
    files = [Path(p) for p in source.paths] + sorted(shard_root.glob("*.tar"))

    def folder_files(step: int):
        return [source.read(r) for r in crops.rows(0, step).tolist()]

    def shard_files():
        return (files for _, files in zip(range(steps), stream.steps(0)))

    runs = {
        "folder read": lambda: [folder_files(s) for s in range(steps)],
        "shards read": lambda: list(shard_files()),
        "folder crops": lambda: [crops.crops(0, s, folder_files(s)) for s in range(steps)],
        "shards crops": lambda: [crops.crops(0, s, f) for s, f in enumerate(shard_files())],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            if args.cold:
                drop_from_cache(files)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {name: steps * batch / statistics.median(t) for name, t in times.items()}
    cache = "cold page cache (posix_fadvise DONTNEED before each run)" if args.cold else "warm page cache"
    print(f"{steps * batch} images of {args.root} at {args.size} px, one core, median of {args.repeats}; {cache}")
    print(
        f"read   images/s  folder {rate['folder read']:9.1f}  shards {rate['shards read']:9.1f}  "
        f"ratio {rate['shards read'] / rate['folder read']:.2f}"
    )
    print(
        f"crops  pairs/s   folder {rate['folder crops']:9.1f}  shards {rate['shards crops']:9.1f}  "
        f"ratio {rate['shards crops'] / rate['folder crops']:.2f}"
    )


if __name__ == "__main__":
    main()

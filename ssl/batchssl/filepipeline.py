"""Views of image files, split where the cost is (data.pipeline: split, the default for imagefolder).

Loader workers only read, decode and crop: each image is decoded once, at reduced scale where the JPEG allows it
(batchssl.decode), every view's RandomResizedCrop is cut and resized to that view's output size, and a whole
step's uint8 crops (one (B, S_v, S_v, 3) tensor per view) go to the trainer. Flip, colour jitter, grayscale, blur,
solarisation and normalisation then run batched on the training device (`DeviceViews.render_crops`); when the
training device is the CPU, the loader workers run those batched ops too, beside the training step.

Randomness: a step's crop boxes and photometric parameters come from the same per-step draws as the in-memory
pipeline (`views.step_params`, the row of each position in the global batch); the box of position p is
torchvision's `RandomResizedCrop.get_params` on that image's own height and width. So a sample's views depend
only on (seed, epoch, step, position) and the file: not on the number of processes or loader workers, nor on a
resume. One loader item is one step's rows for this process: workers cut whole batches, delivered in step order.

data.decode gpu (auto stays cpu until it is measured on a GPU): workers read the files and draw the boxes as above
but decode only what nvJPEG cannot take; the training process decodes the other rows' JPEGs in one batched call on
the device and cuts their crops there (`decode.decode_crops_on_device`). Same boxes, so the same resume and N-process
rules; the pixels differ from the CPU path's by the decoders' and filters' rounding (full scale, not DCT-reduced).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from batchssl.config import Config
from batchssl.data import DatasetInfo, epoch_order
from batchssl.decode import (
    decode_crops,
    decode_crops_on_device,
    decode_jpegs,
    device_decodable,
    image_size,
    read_file,
)
from batchssl.errors import UserError

EMPTY_CHECK = 1000  # files stat-ed before training for the 0-byte check (spread evenly over the split)


class FileSource:
    """Encoded images as files: (path, label) pairs. `read(i)` returns (bytes, name for messages, label)."""

    def __init__(self, samples: Sequence[tuple[str, int]]):
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[bytes, str, int]:
        path = self.paths[index]
        return read_file(path), path, int(self.labels[index])

    def check_not_empty(self, folder: str) -> None:
        """Before training: refuse a split with 0-byte files, naming one (checks EMPTY_CHECK files of the split,
        so a folder of millions costs no full scan; a later empty file stops training naming it)."""
        if not self.paths:
            return
        picks = np.unique(np.linspace(0, len(self.paths) - 1, min(EMPTY_CHECK, len(self.paths))).astype(int))
        empty = [self.paths[i] for i in picks if os.path.getsize(self.paths[i]) == 0]
        if len(empty) == len(picks):
            raise UserError(
                f"image folder {folder}: every image file checked ({len(picks)}) is empty (0 bytes), "
                f"e.g. {empty[0]}: copy the images again"
            )
        if empty:
            raise UserError(
                f"image folder {folder}: {len(empty)} of {len(picks)} image files checked are empty "
                f"(0 bytes), e.g. {empty[0]}: remove or replace them"
            )


class Encoded(NamedTuple):
    """A step's rows left for the training device to decode (data.decode gpu)."""

    rows: Tensor  # their positions among the step's rows
    datas: list[Tensor]  # their encoded JPEGs, uint8 (bytes,)
    boxes: Tensor  # (n, views, 4) crop boxes
    names: list[str]  # the files, for error messages
    worker_rows: Tensor  # the positions of the rows the worker decoded (the crops' rows), in order


class StepCrops(Dataset):
    """Indexed by (epoch, step): this process's rows of the step as ([uint8 (B, S_v, S_v, 3) per view], labels);
    with device_decode, ([the worker-decoded rows' crops per view], labels, Encoded: the rest).

    specs: the views' ViewSpecs (batchssl.views.view_specs): each view's crop scale, ratio and output size.
    reduce=False decodes every image at full scale (the reference for tests and benchmarks)."""

    def __init__(
        self,
        source,
        specs: Sequence,
        seed: int,
        global_batch: int,
        positions: Tensor,
        reduce: bool = True,
        device_decode: bool = False,
    ):
        self.source, self.specs, self.seed = source, list(specs), seed
        self.global_batch, self.positions, self.reduce = global_batch, torch.as_tensor(positions), reduce
        self.device_decode = device_decode
        self._order: tuple[int, Tensor] | None = None  # (epoch, its (steps, this process's rows) table)
        self.render = None  # a DeviceViews: the workers also make the views (training on the CPU)

    def rows(self, epoch: int, step: int) -> Tensor:
        """Indices into the source of this process's rows of a step (the pipelines' shared epoch order)."""
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(len(self.source), self.global_batch, self.seed, epoch)
            self._order = (epoch, order.view(-1, self.global_batch)[:, self.positions])
        return self._order[1][step]

    def __len__(self) -> int:
        return len(self.source) // self.global_batch

    def __getitem__(self, key: tuple):
        """key: (epoch, step), the rows read from the source; or (epoch, step, files) from a shard stream.
        With `render` set (a DeviceViews), the finished views instead of the crops."""
        epoch, step = key[:2]
        files = key[2] if len(key) == 3 else [self.source.read(row) for row in self.rows(epoch, step).tolist()]
        if self.render is None:
            return self.crops(epoch, step, files)
        crops, labels = self.crops(epoch, step, files)
        params = self.render.params(self.seed, epoch, step, 1, 1, self.positions, self.global_batch)
        return self.render.render_crops([c.permute(0, 3, 1, 2) for c in crops], params), labels

    def boxes(self, epoch: int, step: int, heights: Tensor, widths: Tensor) -> Tensor:
        """(B, views, 4) crop boxes (top, left, height, width) of this process's rows of a step, for images of
        the given sizes: RandomResizedCrop.get_params from the step's draws (views.step_params)."""
        from batchssl.views import step_params

        params = step_params(self.specs, self.seed, epoch, step, self.global_batch, self.positions, heights, widths)
        return torch.stack([torch.stack([p.top, p.left, p.height, p.width], dim=1) for p in params], dim=1)

    def crops(self, epoch: int, step: int, files: Sequence[tuple[bytes, str, int]]):
        """The step's crops of the given encoded images (this process's rows, in order)."""
        sizes = torch.tensor([image_size(data, name) for data, name, _ in files], dtype=torch.long).view(-1, 2)
        boxes = self.boxes(epoch, step, sizes[:, 0], sizes[:, 1])
        labels = torch.tensor([label for _, _, label in files], dtype=torch.long)
        if not self.device_decode:
            return self._decoded(files, boxes, range(len(files))), labels
        # data.decode gpu: the worker decodes only the rows nvJPEG cannot take; the rest travel encoded.
        device_rows = [i for i, (data, _, _) in enumerate(files) if device_decodable(data)]
        worker_rows = sorted(set(range(len(files))) - set(device_rows))
        encoded = Encoded(
            rows=torch.tensor(device_rows, dtype=torch.long),
            datas=[torch.frombuffer(bytearray(files[i][0]), dtype=torch.uint8) for i in device_rows],
            boxes=boxes[device_rows],
            names=[files[i][1] for i in device_rows],
            worker_rows=torch.tensor(worker_rows, dtype=torch.long),
        )
        return self._decoded(files, boxes, worker_rows), labels, encoded

    def _decoded(self, files, boxes: Tensor, rows: Sequence[int]) -> list[Tensor]:
        """Every view's uint8 (len(rows), S_v, S_v, 3) crops of the given rows, decoded here."""
        views = [np.empty((len(rows), spec.size, spec.size, 3), dtype=np.uint8) for spec in self.specs]
        out_sizes = [spec.size for spec in self.specs]
        for i, row in enumerate(rows):
            data, name, _ = files[row]
            for v, crop in enumerate(decode_crops(data, boxes[row].tolist(), out_sizes, name, self.reduce)):
                views[v][i] = crop
        return [torch.from_numpy(v) for v in views]


class _Steps(Sampler):
    """The keys (epoch, step) of one epoch, in order."""

    def __init__(self, steps: int):
        self.steps, self.epoch, self.start = steps, 0, 0  # start > 0: resumed from a step checkpoint

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(self.epoch, step) for step in range(self.start, self.steps)])


class _StreamSteps(Sampler):
    """The keys (epoch, step, files) of one epoch, files read from this process's shards (batchssl.shards)."""

    def __init__(self, stream):
        self.stream, self.epoch, self.start = stream, 0, 0  # start > 0: resumed from a step checkpoint

    def __len__(self) -> int:
        return self.stream.steps_per_epoch

    def __iter__(self):
        # A sequential stream: the skipped steps' files are read (not decoded) to reach step `start`.
        return (
            (self.epoch, step, files) for step, files in enumerate(self.stream.steps(self.epoch)) if step >= self.start
        )


class SplitPipeline:
    """Crops from loader workers, the rest on the device. See the module docstring."""

    def __init__(
        self,
        cfg: Config,
        info: DatasetInfo,
        source,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        stream=None,
        device_decode: bool = False,
    ):
        """source: random access to the images (FileSource, shards.ShardImages); stream: a shards.ShardStream
        that delivers each step's images instead (the source is then unused). device_decode: the device decodes
        the JPEGs (data.decode resolved by `decode_on_device`; on the CPU it runs too, with torchvision's CPU
        decoder)."""
        from batchssl.views import DeviceViews

        self.seed, self.batch = cfg.seed, cfg.train.batch_size
        self.positions = torch.arange(rank, self.batch, world)  # this process's rows of every global batch
        self.views = DeviceViews(cfg, info, global_batch=self.batch)
        self.crops = StepCrops(
            source, self.views.specs, cfg.seed, self.batch, self.positions, device_decode=device_decode
        )
        self.sampler = _Steps(len(self.crops)) if stream is None else _StreamSteps(stream)
        workers = cfg.data.num_workers
        # Training on the CPU, the "device" part would run in the training process, serially with the step: the
        # loader workers do it instead, with the same batched ops and parameters, beside the step.
        self.views_in_workers = device.type == "cpu" and workers > 0 and not device_decode
        if self.views_in_workers:
            self.crops.render = self.views
        self.loader = DataLoader(
            self.crops,
            batch_size=None,
            sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        self.device = device
        self.has_labels, self.has_unlabelled = info.num_classes >= 2, False

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def render(self, crops: Sequence[Tensor], epoch: int, step: int, encoded: Encoded | None = None) -> list[Tensor]:
        """The device's part: flip, photometric ops and normalisation of one step's uint8 crops (B, S, S, 3);
        with `encoded` (data.decode gpu), the crops are the worker-decoded rows' and the rest are decoded here."""
        # render_crops does not read the crop boxes, so the parameters' image size does not matter.
        params = self.views.params(self.seed, epoch, step, 1, 1, self.positions, self.batch)
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        if encoded is not None:
            crops = self._merge(crops, encoded)
        return self.views.render_crops([c.permute(0, 3, 1, 2) for c in crops], params)

    def _merge(self, crops: Sequence[Tensor], encoded: Encoded) -> list[Tensor]:
        """The step's (B, S, S, 3) crops: the worker's rows, and the encoded rows decoded on the device."""
        sizes = [spec.size for spec in self.views.specs]
        decoded = decode_crops_on_device(encoded.datas, encoded.boxes, sizes, self.device, encoded.names)
        rows, worker_rows = encoded.rows.to(self.device), encoded.worker_rows.to(self.device)
        merged = []
        for worker_part, device_part, size in zip(crops, decoded, sizes):
            out = torch.empty(len(rows) + len(worker_rows), size, size, 3, dtype=torch.uint8, device=self.device)
            out[worker_rows] = worker_part
            out[rows] = device_part.permute(0, 2, 3, 1)
            merged.append(out)
        return merged

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Steps start.. of the epoch (start > 0: resumed from a step checkpoint)."""
        self.sampler.epoch, self.sampler.start = epoch, start
        for step, (crops, labels, *encoded) in enumerate(self.loader, start=start):
            views = crops if self.views_in_workers else self.render(crops, epoch, step, *encoded)
            yield views, labels.to(self.device, non_blocking=True)


def image_folder_source(cfg: Config) -> FileSource:
    """The pretraining split of data.root/train as files (holdout, limits, long tail applied), checked for
    0-byte files before training."""
    from batchssl.data import _pretrain_rows

    base, rows = _pretrain_rows(cfg.data)
    source = FileSource([base.samples[int(r)] for r in rows])
    source.check_not_empty(str(Path(cfg.data.root) / "train"))
    return source


def build_split_pipeline(
    cfg: Config, info: DatasetInfo, device: torch.device, rank: int = 0, world: int = 1
) -> SplitPipeline:
    """The split pipeline of an ImageFolder or a shard directory (data.name imagefolder | shards).

    Shards are streamed (each process its own, sequentially) unless a cut of the pretraining split (data.limit,
    holdout, pretrain_limit, imbalance_ratio) needs its rows: then they are read by random access."""
    d = cfg.data
    if d.name not in ("imagefolder", "shards"):
        raise UserError(
            f"data.pipeline=split reads image files; {d.name} is held in memory: use data.pipeline=device (or auto)"
        )
    on_device = decode_on_device(d.decode, device)
    if d.name == "imagefolder":
        return SplitPipeline(cfg, info, image_folder_source(cfg), device, rank, world, device_decode=on_device)
    from batchssl.shards import ShardStream

    if d.limit is None and d.pretrain_limit is None and d.holdout == 0 and d.imbalance_ratio == 1:
        stream = ShardStream(d.root, cfg.seed, cfg.train.batch_size, rank, world, d.shuffle_buffer)
        return SplitPipeline(cfg, info, None, device, rank, world, stream=stream, device_decode=on_device)
    from batchssl.data import Rows, _pretrain_rows

    base, rows = _pretrain_rows(d)
    return SplitPipeline(cfg, info, _RowsSource(Rows(base, rows)), device, rank, world, device_decode=on_device)


def decode_on_device(choice: str, device: torch.device) -> bool:
    """data.decode for this training device: gpu -> True, refused (one line) where the device cannot decode JPEGs;
    cpu and auto -> False. auto stays on the workers until the GPU path has been measured on a GPU
    (benchmarks/gpu_check.sh, part 1d): it was written and tested on the CPU only, and decoding at reduced DCT scale
    on enough loader cores may well beat a full-scale nvJPEG decode."""
    if choice != "gpu":
        return False
    problem = _device_decode_problem(device)
    if problem is not None:
        raise UserError(f"data.decode=gpu decodes JPEGs on a CUDA training device, but {problem}: pass data.decode=cpu")
    return True


def _device_decode_problem(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on `device`, or None: it is CUDA and torchvision decodes a tiny JPEG there."""
    if device.type != "cuda":
        return f"this run trains on the {device.type.upper()} (no CUDA GPU found, or the launcher chose the CPU)"
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, "JPEG")
    try:
        decode_jpegs([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    except RuntimeError as err:  # torchvision built without nvJPEG, or nvJPEG cannot start on this GPU
        return f"torchvision cannot decode JPEGs on {device} ({str(err).strip().splitlines()[0]})"
    return None


class _RowsSource:
    """`read` through data.Rows (a cut of a random-access source)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int):
        return self.rows.base.read(int(self.rows.rows[index]))

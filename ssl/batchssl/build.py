"""Everything a pretraining run needs, built in one place from its config: `build_training(cfg, accelerator)`.

The trainer (batchssl.train), `pretrain.py --plan` (batchssl.plan), the benchmarks and the in-process tests all
build through here, so what they run or time is the same model, optimiser, pipeline and schedule:

    pipeline   where each step's views come from (`build_pipeline`: the one place a pipeline is chosen)
    method     backbone (channels_last for ResNets) + method heads, synced batch norm on several processes, the
               optimiser over its parameter groups, `accelerator.prepare`, then train.compile
    schedule   the lr of every step (warmup to the peak, then a half cosine to peak x optim.final_lr_ratio)
    online     the online linear probe (monitor.online_linear), registered with the checkpoints

Randomness: torch's global generator is seeded with cfg.seed before the model is made, so every process (and
every tool that builds a run) starts from the same initial weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from batchssl.backbones import build_backbone, channels_last_arch
from batchssl.config import Config
from batchssl.cpu import effective_precision
from batchssl.data import DatasetInfo, dataset_info, pretrain_dataset
from batchssl.distributed import convert_sync_batchnorm, init_model_group
from batchssl.errors import UserError
from batchssl.methods import build_method
from batchssl.online_linear import OnlineLinear
from batchssl.optim import apply_lr, apply_weight_decay, build_optimizer, peak_lr, scheduled_lr, scheduled_weight_decay


@dataclass(frozen=True)
class Schedule:
    """The run's learning rate and weight decay per optimiser step (0-based), from optim.* and the run's length."""

    cfg: Config
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: Config, steps_per_epoch: int) -> Schedule:
        return cls(cfg, cfg.train.epochs * steps_per_epoch, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))

    @property
    def peak(self) -> float:
        return peak_lr(self.cfg)

    def lr(self, step: int) -> float:
        return scheduled_lr(self.cfg, step, self.total_steps, self.warmup_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr (and weight decay, under optim.weight_decay_end) for `step`; returns the lr."""
        lr = self.lr(step)
        apply_lr(optimizer, lr, self.peak)
        if self.cfg.optim.weight_decay_end is not None:
            apply_weight_decay(optimizer, scheduled_weight_decay(self.cfg.optim, step, self.total_steps))
        return lr


@dataclass
class Training:
    """What `build_training` returns: a run's parts, ready to step."""

    info: DatasetInfo
    pipeline: object  # DevicePipeline, WorkerPipeline or another: steps_per_epoch, batches(epoch), has_labels
    method: nn.Module  # as prepared by the accelerator (DDP-wrapped on several processes)
    inner: nn.Module  # the method itself (backbone, heads): what checkpoints name and the monitor reads
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    online: OnlineLinear | None
    feature_dim: int

    @property
    def steps_per_epoch(self) -> int:
        return self.pipeline.steps_per_epoch


def resolve_precision(requested: str) -> str:
    """bf16 on a CPU without native bf16 would be emulated and slower than fp32: say so once, run fp32."""
    on_cpu = not torch.cuda.is_available()
    if effective_precision(requested, on_cpu) != requested:
        if os.environ.get("RANK", "0") == "0":
            print("train.mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); training in fp32")
        return "no"
    if requested == "fp16" and on_cpu:
        raise UserError("train.mixed_precision=fp16 needs a GPU; on a CPU use bf16 (native on recent CPUs) or no")
    return requested


def check_batch(batch_size: int, world: int) -> None:
    if batch_size < world or batch_size % world:
        raise UserError(
            f"train.batch_size={batch_size} must be a multiple of the number of processes "
            f"({world}), at least one image per process"
        )
    if batch_size // world < 2:
        raise UserError(
            f"train.batch_size={batch_size} gives {batch_size // world} image per process on "
            f"{world} processes; batch norm needs at least 2"
        )


def uses_loader_workers(cfg: Config) -> bool:
    """Whether the views come from loader workers (data.pipeline workers, or a dataset read from disk)."""
    return cfg.data.pipeline in ("workers", "split") or cfg.data.name in ("imagefolder", "shards")


def uses_channels_last(cfg: Config) -> bool:
    """Convolutional backbones (ResNets, timm's) run in channels_last on every device (faster convolutions on GPUs
    and on CPUs with oneDNN)."""
    return cfg.train.channels_last and channels_last_arch(cfg.model.arch)


def build_pipeline(cfg: Config, info: DatasetInfo, device: torch.device, rank: int, world: int):
    """In-memory datasets: the device pipeline (data.pipeline auto or device). Image files (imagefolder, shards):
    the split pipeline (auto or split: workers decode and crop, the device does the rest). data.pipeline=workers:
    lightly's per-sample chain in loader workers."""
    from batchssl.data import in_memory_pretrain_images
    from batchssl.filepipeline import build_split_pipeline
    from batchssl.pipeline import DevicePipeline, WorkerPipeline

    files = cfg.data.name in ("imagefolder", "shards")
    if cfg.data.pipeline == "split" or (cfg.data.pipeline == "auto" and files):
        return build_split_pipeline(cfg, info, device, rank, world)
    if cfg.data.pipeline != "workers":
        arrays = None if files else in_memory_pretrain_images(cfg.data)
        if arrays is not None:
            return DevicePipeline(cfg, info, *arrays, device=device, rank=rank, world=world)
        raise UserError(
            f"data.pipeline=device needs an in-memory dataset; {cfg.data.name} is read from disk: "
            "use data.pipeline=split (or auto)"
        )
    return WorkerPipeline(
        cfg, info, pretrain_dataset(cfg.data), device, rank, world, channels_last=uses_channels_last(cfg)
    )


def build_model(
    cfg: Config, info: DatasetInfo, accelerator: Accelerator, wrap: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """(prepared method, optimiser, backbone feature dimension). `wrap` (benchmarks: a bf16 autocast around one
    variant's forward) wraps the method before it is prepared; the trainer passes none."""
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    if uses_channels_last(cfg):
        backbone = backbone.to(memory_format=torch.channels_last)
    method = build_method(cfg, backbone, feature_dim)
    if accelerator.num_processes > 1:
        init_model_group(accelerator.device)
        method = convert_sync_batchnorm(method, accelerator.device)
    optimizer = build_optimizer(method.parameter_groups(cfg.optim), cfg.optim)
    model = wrap(method) if wrap is not None else method
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile != "none":
        # Module.compile keeps parameter names (no _orig_mod. prefix), so checkpoints and exports are unchanged.
        (method.backbone if cfg.train.compile == "backbone" else model).compile()
    return model, optimizer, feature_dim


def build_online_linear(cfg: Config, info: DatasetInfo, feature_dim: int, pipeline, accelerator: Accelerator):
    """The online linear probe (monitor.online_linear), registered with the checkpoints; None when it is off or
    the pretraining split has no labels at all."""
    if not (cfg.monitor.enabled and cfg.monitor.online_linear) or info.num_classes < 2:
        return None
    if not pipeline.has_labels:
        return None
    probe = OnlineLinear(feature_dim, info.num_classes, seed=cfg.seed, skip_unlabelled=pipeline.has_unlabelled).to(
        accelerator.device
    )
    accelerator.register_for_checkpointing(probe)
    return probe


def build_training(cfg: Config, accelerator: Accelerator, pipeline=None) -> Training:
    """A run's parts on this process. `pipeline` replaces the config's (benchmarks: synthetic images); the
    config's is built otherwise. Raises UserError on bad input."""
    check_batch(cfg.train.batch_size, accelerator.num_processes)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    info = dataset_info(cfg.data)
    if pipeline is None:
        pipeline = build_pipeline(cfg, info, accelerator.device, accelerator.process_index, accelerator.num_processes)
    if pipeline.steps_per_epoch == 0:
        raise UserError(f"the pretraining split has fewer images than train.batch_size={cfg.train.batch_size}")
    method, optimizer, feature_dim = build_model(cfg, info, accelerator)
    inner = accelerator.unwrap_model(method)
    online = build_online_linear(cfg, info, feature_dim, pipeline, accelerator)
    return Training(
        info, pipeline, method, inner, optimizer, Schedule.of(cfg, pipeline.steps_per_epoch), online, feature_dim
    )

"""The one training loop, on HuggingFace Accelerate (1 CPU, 1 GPU, many GPUs, many nodes).

It knows nothing of any one method: it builds one from the registry, calls forward(views, step, total_steps),
backpropagates "loss", steps the optimizer with a per-step warmup + cosine lr, and logs the rest of the dict.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from batchssl import checkpoint as ckpt
from batchssl.augment import view_transforms
from batchssl.backbones import build_backbone
from batchssl.config import Config, save_config, to_dict
from batchssl.cpu import tune_malloc
from batchssl.data import EpochShardSampler, TwoViews, dataset_info, pretrain_dataset
from batchssl.distributed import convert_sync_batchnorm, init_model_group, make_accelerator
from batchssl.errors import NonFiniteLossError, UserError
from batchssl.eval.frozen import feature_dtype
from batchssl.methods import build_method
from batchssl.monitor import KnnMonitor
from batchssl.optim import apply_lr, build_optimizer, peak_lr, warmup_cosine


class MetricsLog:
    """metrics.jsonl (main process) plus the optional Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, path: Path, trackers: bool):
        self.accelerator, self.path, self.trackers = accelerator, path, trackers

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=record["step"])


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines an interrupted run logged after the checkpoint it resumes from (they are logged again)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
        if len(kept) != len(lines):
            path.write_text("".join(kept))


def _check_trackers(log_with: str | None) -> None:
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(log_with)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"train.log_with={log_with} needs the '{package}' package: pip install {package}")


def check_batch(batch_size: int, world: int) -> None:
    if batch_size < world or batch_size % world:
        raise UserError(f"train.batch_size={batch_size} must be a multiple of the number of processes "
                        f"({world}), at least one image per process")
    if batch_size // world < 2:
        raise UserError(f"train.batch_size={batch_size} gives {batch_size // world} image per process on "
                        f"{world} processes; batch norm needs at least 2")


def resume_target(cfg: Config, out: Path) -> Path | None:
    """The checkpoint to resume from, per checkpoint.resume (auto | none | a directory)."""
    if cfg.checkpoint.resume == "auto":
        return ckpt.latest_checkpoint(out)
    if cfg.checkpoint.resume != "none":
        path = Path(cfg.checkpoint.resume)
        if not path.is_dir():
            raise UserError(f"checkpoint.resume: no checkpoint directory at {path}")
        return path
    if ckpt.latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints and checkpoint.resume=none would overwrite them: "
                        "use another output_dir or checkpoint.resume=auto")
    return None


def train_step(method, optimizer, accelerator: Accelerator, views, step: int, total_steps: int,
               max_grad_norm: float | None) -> dict[str, float]:
    """Forward, NaN check, backward, optimizer step. Returns the global mean of every number the method logs."""
    views = [v.to(accelerator.device, non_blocking=True) for v in views]
    outputs = method(views, step, total_steps)
    # One all-reduce per step: the global mean of every logged number, which is also the NaN check (all
    # processes see the same value, so all stop together).
    names = sorted(outputs)
    values = accelerator.reduce(torch.stack([outputs[k].detach().float().to(accelerator.device) for k in names]),
                                reduction="mean").tolist()
    metrics = dict(zip(names, values))
    if not math.isfinite(metrics["loss"]):
        return metrics  # the caller stops before the update
    accelerator.backward(outputs["loss"])
    if max_grad_norm:
        accelerator.clip_grad_norm_(method.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def train(cfg: Config) -> dict:
    """Pretrain as the config says; returns the last logged metrics. Raises UserError on bad input."""
    _check_trackers(cfg.train.log_with)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, log_with=cfg.train.log_with,
                                   project_dir=str(out))
    if accelerator.device.type == "cpu":
        tune_malloc()
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batch(cfg.train.batch_size, world)
    resume_from = resume_target(cfg, out)  # resolved before anything is written, so bad input loses nothing

    set_seed(cfg.seed)  # the same initial weights on every process
    info = dataset_info(cfg.data)
    images = pretrain_dataset(cfg.data)
    if len(images) < cfg.train.batch_size:
        raise UserError(f"{len(images)} training images are fewer than train.batch_size={cfg.train.batch_size}")
    sampler = EpochShardSampler(len(images), cfg.train.batch_size, cfg.seed, rank, world)
    loader = DataLoader(TwoViews(images, view_transforms(cfg, info), cfg.seed), sampler=sampler,
                        batch_size=cfg.train.batch_size // world, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        pin_memory=accelerator.device.type == "cuda")
    monitor = KnnMonitor(cfg, info) if cfg.monitor.enabled else None

    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    method = build_method(cfg, backbone, feature_dim)
    if world > 1:
        init_model_group(accelerator.device)
        method = convert_sync_batchnorm(method, accelerator.device)
    optimizer = build_optimizer(method.parameter_groups(cfg.optim), cfg.optim)
    method, optimizer = accelerator.prepare(method, optimizer)
    inner = accelerator.unwrap_model(method)

    start_epoch = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, cfg)
        start_epoch = state["epoch"]
        accelerator.print(f"resumed from {resume_from} (epoch {start_epoch})")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        truncate_metrics(out / "metrics.jsonl", start_epoch * sampler.steps_per_epoch())
    if cfg.train.log_with:
        accelerator.init_trackers("batchssl", config={f"{s}.{k}": v for s, sec in to_dict(cfg).items()
                                                      if isinstance(sec, dict) for k, v in sec.items()})
    log = MetricsLog(accelerator, out / "metrics.jsonl", trackers=bool(cfg.train.log_with))

    steps_per_epoch = sampler.steps_per_epoch()
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    peak = peak_lr(cfg)
    eval_dtype = feature_dtype(cfg.train.mixed_precision)
    last: dict = {}
    knn_postfix: dict = {}

    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        method.train()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True,
                  disable=not accelerator.is_local_main_process) as bar:
            interval_start, interval_steps = time.perf_counter(), 0
            for i, (views, _) in enumerate(loader):
                step = epoch * steps_per_epoch + i
                lr = warmup_cosine(step, total_steps, warmup_steps, peak)
                apply_lr(optimizer, lr, peak)
                metrics = train_step(method, optimizer, accelerator, views, step, total_steps,
                                     cfg.train.max_grad_norm)
                if not math.isfinite(metrics["loss"]):
                    good = ckpt.latest_checkpoint(out)
                    raise NonFiniteLossError(
                        f"loss is {metrics['loss']} at step {step + 1} (epoch {epoch + 1}); training stopped. "
                        f"Newest good checkpoint: {good or 'none'}. Lower optim.base_lr or use train.max_grad_norm")
                interval_steps += 1
                bar.update(1)
                if (step + 1) % cfg.train.log_every_n_steps == 0 or i == steps_per_epoch - 1:
                    elapsed = time.perf_counter() - interval_start
                    last = {"epoch": epoch + 1, "step": step + 1, "lr": lr, **metrics,
                            "images_per_s": interval_steps * cfg.train.batch_size / max(elapsed, 1e-9)}
                    log.write(last)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", **knn_postfix)
                    interval_start, interval_steps = time.perf_counter(), 0

        done = epoch + 1
        final = done == cfg.train.epochs
        # The monitor runs before the checkpoint: a run stopped between the two resumes from the previous
        # checkpoint and monitors this epoch again, and the checkpoint's RNG state is the one after the monitor
        # (its loaders draw from torch's global generator), so a resumed run continues exactly as one that never
        # stopped; the other order loses the epoch's kNN line and shifts the random stream.
        every = cfg.monitor.every_n_epochs
        if monitor and (final or (every and done % every == 0)):
            result = monitor(inner.backbone, accelerator, eval_dtype)
            if accelerator.is_main_process:
                log.write({"epoch": done, "step": done * steps_per_epoch, **result})
                knn_postfix = {"knn": f"{result['knn_top1']:.2f}"}
                accelerator.print(f"epoch {done}: kNN top-1 {result['knn_top1']:.2f} top-5 {result['knn_top5']:.2f} "
                                  f"({result['knn_seconds']:.1f} s)")
                last.update(result)
        every = cfg.checkpoint.every_n_epochs
        if final or (every and done % every == 0):
            state = {"epoch": done, "step": done * steps_per_epoch, "model_signature": ckpt.model_signature(cfg)}
            ckpt.save_checkpoint(accelerator, out, state, cfg.checkpoint.keep_last)
            if accelerator.is_main_process:
                ckpt.export_backbone(inner.backbone, out / ckpt.BACKBONE_FILE)

    if start_epoch >= cfg.train.epochs and accelerator.is_main_process:
        accelerator.print(f"{out}: already trained for {cfg.train.epochs} epochs; nothing to do")
        ckpt.export_backbone(inner.backbone, out / ckpt.BACKBONE_FILE)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last

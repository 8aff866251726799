"""The one training loop, on HuggingFace Accelerate (1 CPU, 1 GPU, many GPUs, many nodes).

It knows nothing of any one method: it builds one from the registry, calls forward(views, step, total_steps),
backpropagates "loss", steps the optimizer with a per-step warmup + cosine lr, and logs the rest of the dict.

Randomness: a step's views come from (seed, epoch, step) alone (batchssl.pipeline), and torch's global generator
is re-seeded from (seed, epoch, step, rank) before every step, so whatever a step draws (BatchFormer's dropout)
does not depend on what ran before it in this process: a run resumed from any checkpoint, with or without loader
workers, repeats the uninterrupted run's steps exactly.

Host synchronisation: a step queues its work and its logged numbers stay on the device; they are read back (and
the loss checked for NaN / inf, naming the first bad step) only on log steps, which include every epoch's last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from batchssl import checkpoint as ckpt
from batchssl.backbones import build_backbone
from batchssl.collapse import CollapseAlarm
from batchssl.config import Config, to_dict
from batchssl.cpu import effective_precision, tune_malloc, use_all_cores
from batchssl.data import dataset_info, pretrain_dataset, sample_seed
from batchssl.distributed import convert_sync_batchnorm, init_model_group, make_accelerator
from batchssl.errors import NonFiniteLossError, UserError
from batchssl.eval.frozen import feature_dtype
from batchssl.methods import build_method
from batchssl.monitor import KnnMonitor
from batchssl.online_linear import OnlineLinear, feature_tap, gather_rows
from batchssl.optim import apply_lr, build_optimizer, peak_lr, scheduled_lr

# Test-only: the trainer SIGKILLs itself right after this global step (1-based) has been logged, a deterministic
# stand-in for `kill -9` at an exact moment; BATCHSSL_TEST_KILL_IN_CHECKPOINT=N does it half way through writing
# the checkpoint of epoch N (after Accelerate's files, before the rename).
KILL_AFTER_STEP = "BATCHSSL_TEST_KILL_AFTER_STEP"
KILL_IN_CHECKPOINT = "BATCHSSL_TEST_KILL_IN_CHECKPOINT"
_STEP_STREAM = 1  # separates the per-step generator's seeds from the views' (which use (seed, epoch, step))


def _maybe_kill(variable: str, value: int) -> None:
    if os.environ.get(variable) == str(value):
        os.kill(os.getpid(), signal.SIGKILL)


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
    """Drop the lines an interrupted run logged after the checkpoint it resumes from (they are logged again),
    and a last line cut short by a kill."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except ValueError:  # half-written when the process was killed
                pass
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


def claim_cores(cfg: Config, accelerator: Accelerator) -> None:
    """All cores divided among this machine's processes when `accelerate launch` forced one thread each (less
    the loader workers that run beside the step, with data.pipeline workers)."""
    workers = cfg.data.num_workers if uses_loader_workers(cfg) else 0
    threads = use_all_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), workers)
    if threads and accelerator.is_local_main_process:
        print(f"accelerate launch set 1 CPU thread per process; using {threads} "
              "(set OMP_NUM_THREADS or --num_cpu_threads_per_process to choose)")


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


def build_pipeline(cfg: Config, info, device: torch.device, rank: int, world: int):
    """The device pipeline for in-memory datasets (data.pipeline auto or device), else loader workers."""
    from batchssl.data import in_memory_pretrain_images
    from batchssl.pipeline import DevicePipeline, WorkerPipeline

    if cfg.data.pipeline != "workers":
        arrays = in_memory_pretrain_images(cfg.data)
        if arrays is not None:
            return DevicePipeline(cfg, info, *arrays, device=device, rank=rank, world=world)
        if cfg.data.pipeline == "device":
            raise UserError(f"data.pipeline=device needs an in-memory dataset; {cfg.data.name} is read from disk: "
                            "use data.pipeline=workers (or auto)")
    return WorkerPipeline(cfg, info, pretrain_dataset(cfg.data), device, rank, world,
                          channels_last=uses_channels_last(cfg))


def uses_loader_workers(cfg: Config) -> bool:
    """Whether the views come from loader workers (data.pipeline workers, or a dataset read from disk)."""
    return cfg.data.pipeline == "workers" or cfg.data.name == "imagefolder"


def uses_channels_last(cfg: Config) -> bool:
    """ResNets run in channels_last on every device (faster convolutions on GPUs and on CPUs with oneDNN)."""
    return cfg.train.channels_last and cfg.model.arch.startswith("resnet")


def build_online_linear(cfg: Config, info, feature_dim: int, pipeline, accelerator: Accelerator):
    """The online linear probe (monitor.online_linear), registered with the checkpoints; None when it is off or
    the pretraining split has no labels at all."""
    if not (cfg.monitor.enabled and cfg.monitor.online_linear) or info.num_classes < 2:
        return None
    if not pipeline.has_labels:
        return None
    probe = OnlineLinear(feature_dim, info.num_classes, seed=cfg.seed,
                         skip_unlabelled=pipeline.has_unlabelled).to(accelerator.device)
    accelerator.register_for_checkpointing(probe)
    return probe


def train_step(method, optimizer, accelerator: Accelerator, views, step: int, total_steps: int,
               max_grad_norm: float | None) -> tuple[list[str], torch.Tensor]:
    """Forward, backward, optimizer step. Returns the names of the numbers the method logs and their values as
    one local float32 tensor on the device (no host synchronisation)."""
    outputs = method(views, step, total_steps)
    accelerator.backward(outputs["loss"])
    if max_grad_norm:
        accelerator.clip_grad_norm_(method.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = sorted(k for k, v in outputs.items() if v.numel() == 1)
    return names, torch.stack([outputs[k].detach().float().reshape(()).to(accelerator.device) for k in names])


def global_metrics(accelerator: Accelerator, names: list[str], values: torch.Tensor) -> dict[str, float]:
    """The global mean over processes of a step's logged numbers (one all-reduce, one read-back)."""
    return dict(zip(names, accelerator.reduce(values, reduction="mean").tolist()))


def first_non_finite_step(accelerator: Accelerator, first_bad: torch.Tensor) -> int | None:
    """The earliest global step (1-based) whose loss was NaN / inf on any process, or None."""
    steps = accelerator.gather(first_bad.view(1)).tolist()
    bad = [s for s in steps if s > 0]
    return int(min(bad)) if bad else None


def train(cfg: Config) -> dict:
    """Pretrain as the config says; returns the last logged metrics. Raises UserError on bad input."""
    _check_trackers(cfg.train.log_with)
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(mixed_precision=precision, log_with=cfg.train.log_with, project_dir=str(out))
    world, rank = accelerator.num_processes, accelerator.process_index
    claim_cores(cfg, accelerator)
    check_batch(cfg.train.batch_size, world)
    lock = ckpt.RunLock(out, "pretrain.py").acquire() if accelerator.is_main_process else None
    try:
        return _train(cfg, out, accelerator, world, rank, precision)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, out: Path, accelerator: Accelerator, world: int, rank: int, precision: str) -> dict:
    resume_from = resume_target(cfg, out)  # resolved before anything is written, so bad input loses nothing
    if accelerator.is_main_process:
        ckpt.check_config_change(cfg, out, resume_from)
    if accelerator.device.type == "cpu":
        tune_malloc()

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    info = dataset_info(cfg.data)
    pipeline = build_pipeline(cfg, info, accelerator.device, rank, world)
    steps_per_epoch = pipeline.steps_per_epoch
    if steps_per_epoch == 0:
        raise UserError(f"the pretraining split has fewer images than train.batch_size={cfg.train.batch_size}")
    monitor = KnnMonitor(cfg, info) if cfg.monitor.enabled else None

    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    if uses_channels_last(cfg):
        backbone = backbone.to(memory_format=torch.channels_last)
    method = build_method(cfg, backbone, feature_dim)
    if world > 1:
        init_model_group(accelerator.device)
        method = convert_sync_batchnorm(method, accelerator.device)
    optimizer = build_optimizer(method.parameter_groups(cfg.optim), cfg.optim)
    method, optimizer = accelerator.prepare(method, optimizer)
    inner = accelerator.unwrap_model(method)
    online = build_online_linear(cfg, info, feature_dim, pipeline, accelerator)
    if cfg.train.compile != "none":
        # Module.compile keeps parameter names (no _orig_mod. prefix), so checkpoints and exports are unchanged.
        (inner.backbone if cfg.train.compile == "backbone" else method).compile()

    start_epoch = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, cfg)
        start_epoch = state["epoch"]
        accelerator.print(f"resumed from {resume_from} (epoch {start_epoch})")

    if accelerator.is_main_process:
        ckpt.record_config(cfg, out, resume_from)
        truncate_metrics(out / "metrics.jsonl", start_epoch * steps_per_epoch)
    if cfg.train.log_with:
        from batchssl.trackers import tracker_config

        # W&B would write ./wandb in the working directory otherwise: keep everything in the run directory.
        accelerator.init_trackers("batchssl", config=tracker_config(to_dict(cfg)),
                                  init_kwargs={"wandb": {"dir": str(out)}} if cfg.train.log_with == "wandb" else {})
    log = MetricsLog(accelerator, out / "metrics.jsonl", trackers=bool(cfg.train.log_with))

    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    peak = peak_lr(cfg)
    eval_dtype = feature_dtype(precision)
    last: dict = {}
    knn_postfix: dict = {}
    alarm = CollapseAlarm(cfg.method.proj_dim, cfg.monitor.collapse_fraction, cfg.monitor.collapse_patience)
    # The first non-finite loss (its global step, 0 while none, and its value), tracked on the device.
    first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)
    first_bad_loss = torch.zeros((), device=accelerator.device)

    for epoch in range(start_epoch, cfg.train.epochs):
        method.train()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True,
                  disable=not accelerator.is_local_main_process) as bar:
            interval_start, interval_steps = time.perf_counter(), 0
            for i, (views, labels) in enumerate(pipeline.batches(epoch)):
                step = epoch * steps_per_epoch + i
                torch.manual_seed(sample_seed(cfg.seed, epoch, i, rank, _STEP_STREAM))
                lr = scheduled_lr(cfg, step, total_steps, warmup_steps)
                apply_lr(optimizer, lr, peak)
                with feature_tap(inner.backbone) if online else nullcontext([]) as taps:
                    names, values = train_step(method, optimizer, accelerator, views, step, total_steps,
                                               cfg.train.max_grad_norm)
                if online is not None:
                    # Detached features of both views; every process trains the same probe on the global rows.
                    online.train_step(*gather_rows(torch.cat(taps), labels.repeat(len(taps))), step, total_steps)
                loss = values[names.index("loss")]
                new_bad = (first_bad == 0) & ~torch.isfinite(loss)
                first_bad = torch.where(new_bad, step + 1, first_bad)
                first_bad_loss = torch.where(new_bad, loss, first_bad_loss)
                interval_steps += 1
                bar.update(1)
                if (step + 1) % cfg.train.log_every_n_steps == 0 or i == steps_per_epoch - 1:
                    bad = first_non_finite_step(accelerator, first_bad)
                    if bad is not None:
                        value = first_bad_loss.item() if first_bad.item() == bad else float("nan")
                        raise NonFiniteLossError(
                            f"loss is {value} at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}); training "
                            f"stopped. Newest good checkpoint: {ckpt.latest_checkpoint(out) or 'none'}. Lower "
                            "optim.base_lr or use train.max_grad_norm")
                    metrics = global_metrics(accelerator, names, values)
                    elapsed = time.perf_counter() - interval_start
                    last = {"epoch": epoch + 1, "step": step + 1, "lr": lr, **metrics,
                            "images_per_s": interval_steps * cfg.train.batch_size / max(elapsed, 1e-9)}
                    if "z_std" in metrics and alarm.update(metrics["z_std"]):
                        last["collapse_alarm"] = True
                        accelerator.print(alarm.message(metrics["z_std"]))
                    log.write(last)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", **knn_postfix)
                    interval_start, interval_steps = time.perf_counter(), 0
                    _maybe_kill(KILL_AFTER_STEP, step + 1)

        done = epoch + 1
        final = done == cfg.train.epochs
        # The monitor runs before the checkpoint: a run stopped between the two resumes from the previous
        # checkpoint and monitors this epoch again, so each epoch's kNN line is written exactly once.
        every = cfg.monitor.every_n_epochs
        if monitor and (final or (every and done % every == 0)):
            result = monitor(inner.backbone, accelerator, eval_dtype, online)
            if accelerator.is_main_process:
                log.write({"epoch": done, "step": done * steps_per_epoch, **result})
                knn_postfix = {"knn": f"{result['knn_top1']:.2f}"}
                line = f"epoch {done}: kNN top-1 {result['knn_top1']:.2f} top-5 {result['knn_top5']:.2f}"
                if "online_top1" in result:
                    knn_postfix["online"] = f"{result['online_top1']:.2f}"
                    line += f", online linear top-1 {result['online_top1']:.2f}"
                accelerator.print(f"{line} ({result['knn_seconds']:.1f} s)")
                last.update(result)
        every = cfg.checkpoint.every_n_epochs
        if final or (every and done % every == 0):
            state = {"epoch": done, "step": done * steps_per_epoch, "model_signature": ckpt.model_signature(cfg)}
            ckpt.save_checkpoint(accelerator, out, state, cfg.checkpoint.keep_last,
                                 before_rename=lambda: _maybe_kill(KILL_IN_CHECKPOINT, done))
            if accelerator.is_main_process:
                ckpt.export_backbone(inner.backbone, out / ckpt.BACKBONE_FILE)

    if start_epoch >= cfg.train.epochs and accelerator.is_main_process:
        accelerator.print(f"{out}: already trained for {cfg.train.epochs} epochs; nothing to do")
        ckpt.export_backbone(inner.backbone, out / ckpt.BACKBONE_FILE)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last

"""`pretrain.py --plan`: what a config will do, before a long run.

The numbers the trainer derives (processes, batches, lr, steps, parameters per part) and an estimate of the epoch
time and memory from a few real training steps on this device (the run's own pipeline, model, optimiser and
precision; nothing is written).
"""

from __future__ import annotations

import os
import resource
import time

import torch

from batchssl.config import Config


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(cfg: Config, timed_steps: int = 3) -> list[tuple[str, str]]:
    """(label, value) rows of the plan; runs 1 warm-up + `timed_steps` steps of real training on this device."""
    from batchssl.build import build_training, check_batch, resolve_precision
    from batchssl.distributed import make_accelerator
    from batchssl.train import train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_batch(cfg.train.batch_size, world)
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(mixed_precision=precision)
    run = build_training(cfg, accelerator)
    pipeline, method, optimizer, schedule = run.pipeline, run.method, run.optimizer, run.schedule
    spe, total, warmup = run.steps_per_epoch, schedule.total_steps, schedule.warmup_steps
    parts = {name: _count(part) for name, part in run.inner.trainable_parts().items()}
    momentum = _count(run.inner) - sum(parts.values())

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method.train()
    batches = pipeline.batches(0)
    seconds = []
    for step in range(1 + min(timed_steps, max(spe - 1, 0))):
        views, _ = next(batches)
        start = time.perf_counter()
        schedule.apply(optimizer, step)
        _, values = train_step(method, optimizer, accelerator, views, step, total, cfg.train)
        values.tolist()  # wait for the device
        if step:  # the first step includes one-off costs (allocations, compilation)
            seconds.append(time.perf_counter() - start)
    step_s = sorted(seconds)[len(seconds) // 2] if seconds else float("nan")
    if accelerator.device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak on the GPU"
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        memory = f"{peak / 2**20:.2f} GiB peak RSS of this process ({(peak - rss_before) / 2**20:.2f} GiB in training)"
    rows = [
        (
            "device",
            f"{accelerator.device} x {world} process(es), {torch.get_num_threads()} CPU threads each, "
            f"precision {precision}, pipeline {type(pipeline).__name__}",
        ),
        ("batch", f"{cfg.train.batch_size} global, {cfg.train.batch_size // world} per process"),
        (
            "learning rate",
            f"peak {schedule.peak:g} (base {cfg.optim.base_lr:g} x {cfg.train.batch_size} / 256), "
            f"{cfg.optim.name}, warmup {warmup} steps then "
            f"{_decay(schedule.peak, cfg.optim.final_lr_ratio)}"
            + (f"; {_target(cfg.method.name)} momentum {_momentum(cfg.method)}" if momentum else ""),
        ),
        ("weight decay", _weight_decay(cfg.optim)),
        ("steps", f"{spe} per epoch x {cfg.train.epochs} epochs = {total}"),
        (
            "parameters",
            ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in parts.items())
            + (f", momentum encoder {momentum / 1e6:.3f} M (not trained)" if momentum else ""),
        ),
        (
            "estimate",
            f"{step_s:.3f} s / step -> {step_s * spe / 60:.1f} min / epoch, "
            f"{step_s * total / 60:.1f} min in all (training only, from {len(seconds)} timed steps)",
        ),
        ("memory", memory),
    ]
    accelerator.end_training()
    return rows


def _decay(peak: float, final_ratio: float) -> str:
    return "constant" if final_ratio == 1 else f"cosine to {peak * final_ratio:g}"


def _target(method: str) -> str:
    return {"mocov3": "MoCo", "dino": "teacher"}.get(method, "target")


def _weight_decay(optim) -> str:
    """The decay of the weights (biases and norms get none) and the lr ratio of those, as the optimiser groups."""
    decay = (
        f"{optim.weight_decay:g}"
        if optim.weight_decay_end is None
        else (f"cosine {optim.weight_decay:g} -> {optim.weight_decay_end:g}")
    )
    ratio = f", at {optim.bias_lr_ratio:g} x the lr" if optim.bias_lr_ratio != 1 else ""
    return f"{decay} on weights; biases and norms none{ratio}"


def _momentum(method) -> str:
    if method.momentum_final == method.momentum:
        return f"constant {method.momentum:g}"
    return f"cosine {method.momentum:g} -> {method.momentum_final:g}"


def print_plan(cfg: Config) -> None:
    rows = plan(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        width = max(len(label) for label, _ in rows)
        print(
            f"plan for {cfg.output_dir}: {cfg.method.name}{' + BatchFormer' if cfg.batchformer.enabled else ''} "
            f"on {cfg.data.name}, {cfg.model.arch} width {cfg.model.width}"
        )
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")

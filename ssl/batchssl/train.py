"""The one training loop, on HuggingFace Accelerate (1 CPU, 1 GPU, many GPUs, many nodes).

It knows nothing of any one method: batchssl.build makes the run's parts from the config, and the loop calls the
method's forward(views, step, total_steps), backpropagates "loss", steps the optimizer at the scheduled lr, and
logs the rest of the dict.

Randomness: a step's views come from (seed, epoch, step) alone (batchssl.pipeline), and torch's global generator
is re-seeded from (seed, epoch, step, rank) before every step, so whatever a step draws (BatchFormer's dropout)
does not depend on what ran before it in this process: a run resumed from any checkpoint, with or without loader
workers, repeats the uninterrupted run's steps exactly. The collapse alarm's count is part of each checkpoint.

Host synchronisation: a step queues its work and its logged numbers stay on the device; they are read back (and
the loss checked for NaN / inf, naming the first bad step) only on log steps, which include every epoch's last.

Checkpoints: at epoch ends (checkpoint.every_n_epochs, after the epoch's monitor line) and after every N-th global
step (checkpoint.every_n_steps); a run resumed from a step checkpoint starts the epoch's pipeline at the next step.
A preemption signal (batchssl.preemption) makes every process finish the step, write a step checkpoint and exit
with 128 + the signal's number.

Process-wide tuning (threads, malloc) is not done here: entry points call batchssl.cpu.tune_process first.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from batchssl import checkpoint as ckpt
from batchssl.build import Training, build_training, check_batch, resolve_precision
from batchssl.collapse import CollapseAlarm
from batchssl.config import Config, TrainConfig, to_dict
from batchssl.consistency import check_same_config
from batchssl.data import sample_seed
from batchssl.distributed import make_accelerator
from batchssl.errors import NonFiniteLossError, UserError
from batchssl.eval.frozen import feature_dtype
from batchssl.monitor import KnnMonitor
from batchssl.online_linear import feature_tap, gather_rows
from batchssl.optim import clip_gradients
from batchssl.preemption import Stopped, StopRequests, join_restarted_group, requeue


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_STEP_STREAM = 1  # separates the per-step generator's seeds from the views' (which use (seed, epoch, step))


class Callback:
    """Extension points of `train()`, as Lightning's callbacks: subclass, override what you need, pass instances
    in `train(cfg, callbacks=[...])`. Hooks run in the training process, in the order given; they observe the run
    and must not change its numbers (a resumed run would not repeat them)."""

    def on_step_end(self, step: int, logged: dict | None) -> None:
        """After global step `step` (1-based) on every process; `logged` is the line metrics.jsonl got for it, None
        when the step was not a log step (train.log_every_n_steps)."""

    def on_checkpoint_staged(self, path: Path) -> None:
        """On the main process once a checkpoint is completely written to `path`, a temporary directory, just
        before it is renamed into place (until then the previous checkpoint is the newest)."""


class MetricsLog:
    """metrics.jsonl (main process) plus the optional Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, path: Path, trackers: bool, group=None):
        self.accelerator, self.path, self.trackers, self.group = accelerator, path, trackers, group

    def write(self, record: dict) -> None:
        """Collective: every process calls it. A failed append (a full disk) stops every process with one line,
        as a failed checkpoint does; a half-written last line is dropped when the run resumes."""
        line = json.dumps(record) + "\n"

        def append() -> None:
            with self.path.open("a") as f:
                f.write(line)

        ckpt.write_on_main(self.accelerator, append, self.path, self.group, need=len(line))
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
        raise UserError(
            f"{out} already holds checkpoints and checkpoint.resume=none would overwrite them: "
            "use another output_dir or checkpoint.resume=auto"
        )
    return None


def train_step(
    method, optimizer, accelerator: Accelerator, views, step: int, total_steps: int, train: TrainConfig
) -> tuple[list[str], torch.Tensor]:
    """Forward, backward, clipping (train.max_grad_norm, _mode), optimizer step. Returns the names of the numbers
    the method logs and their values as one local float32 tensor on the device (no host synchronisation)."""
    outputs = method(views, step, total_steps)
    accelerator.backward(outputs["loss"])
    if train.max_grad_norm:
        clip_gradients(accelerator, method.parameters(), train.max_grad_norm, train.max_grad_norm_mode)
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


def train(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict:
    """Pretrain as the config says; returns the last logged metrics. Raises UserError on bad input."""
    _check_trackers(cfg.train.log_with)
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg.train.mixed_precision)
    join_restarted_group()
    accelerator = make_accelerator(mixed_precision=precision, log_with=cfg.train.log_with, project_dir=str(out))
    if accelerator.num_processes > 1:  # collective: one config and code version on every process (batchssl.consistency)
        check_same_config(cfg)
    check_batch(cfg.train.batch_size, accelerator.num_processes)  # before the lock creates the run directory
    if cfg.checkpoint.every_n_steps < 0:
        raise UserError("checkpoint.every_n_steps must be >= 0 (0: off)")
    stop = StopRequests(cfg.checkpoint.signals, accelerator.num_processes)
    lock = ckpt.RunLock(out, "pretrain.py").acquire() if accelerator.is_main_process else None
    stop.install()
    try:
        return _train(cfg, out, accelerator, precision, callbacks, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: whatever was running stops; the newest checkpoint stands
        newest = ckpt.latest_checkpoint(out)
        raise Stopped(
            2,
            f"interrupted; {'resumes from ' + str(newest) if newest else 'no checkpoint yet'} "
            "when the same command is rerun",
        ) from None
    except Stopped as stopped:
        if not stopped.shown:
            accelerator.print(stopped.message)
        if accelerator.num_processes > 1:
            stop.leave()
        raise
    except ckpt.CheckpointWriteError:
        # Raised on every process together: all of them exit 2 (the main one says why), none killed by torchrun's
        # SIGTERM after the first one exits; the barrier makes sure every one ignores it before any leaves.
        if accelerator.num_processes > 1:
            stop.leave()
            torch.distributed.barrier(group=stop.group)
        raise
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _train(
    cfg: Config, out: Path, accelerator: Accelerator, precision: str, callbacks: Sequence[Callback], stop: StopRequests
) -> dict:
    resume_from = resume_target(cfg, out)  # resolved before anything is written, so bad input loses nothing
    if accelerator.is_main_process:
        ckpt.check_config_change(cfg, out, resume_from)
    run = build_training(cfg, accelerator)
    loop = _Loop(cfg, out, accelerator, run, precision, callbacks, stop)
    start_epoch, start_step = loop.resume(resume_from) if resume_from is not None else (0, 0)
    if accelerator.is_main_process:
        ckpt.record_config(cfg, out, resume_from)
        truncate_metrics(out / "metrics.jsonl", start_step)
    if cfg.train.log_with:
        from batchssl.trackers import tracker_config

        # W&B would write ./wandb in the working directory otherwise: keep everything in the run directory.
        accelerator.init_trackers(
            "batchssl",
            config=tracker_config(to_dict(cfg)),
            init_kwargs={"wandb": {"dir": str(out)}} if cfg.train.log_with == "wandb" else {},
        )

    for epoch in range(start_epoch, cfg.train.epochs):
        # A step checkpoint resumes inside its epoch (possibly after its last step, before the monitor).
        loop.train_epoch(epoch, start_step - epoch * run.steps_per_epoch if epoch == start_epoch else 0)
        loop.end_epoch(epoch + 1)

    if start_epoch >= cfg.train.epochs:
        accelerator.print(f"{out}: already trained for {cfg.train.epochs} epochs; nothing to do")
        loop.export_backbone()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return loop.last


class _Loop:
    """One run's loop state: the step, its log line, the end-of-epoch monitor and checkpoint."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        accelerator: Accelerator,
        run: Training,
        precision: str,
        callbacks: Sequence[Callback],
        stop: StopRequests,
    ):
        self.cfg, self.out, self.accelerator, self.run, self.callbacks = cfg, out, accelerator, run, callbacks
        self.stop = stop
        self.monitor = KnnMonitor(cfg, run.info) if cfg.monitor.enabled else None
        self.eval_dtype = feature_dtype(precision)
        self.log = MetricsLog(accelerator, out / "metrics.jsonl", bool(cfg.train.log_with), stop.group)
        self.alarm = CollapseAlarm(cfg.method.proj_dim, cfg.monitor.collapse_fraction, cfg.monitor.collapse_patience)
        self.last: dict = {}
        self.postfix: dict = {}  # the progress bar's kNN / online numbers, from the latest monitor line
        # The first non-finite loss (its global step, 0 while none, and its value), tracked on the device.
        self.first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.first_bad_loss = torch.zeros((), device=accelerator.device)
        self.interval_start, self.interval_steps = time.perf_counter(), 0  # for images_per_s between log steps

    def resume(self, path: Path) -> tuple[int, int]:
        """Restore the checkpoint at `path` (weights, optimiser, RNGs, probe, alarm); returns (the epoch to run
        next or to finish, the global steps done). An epoch checkpoint's epoch is the number of epochs done; a step
        checkpoint's is the epoch it was written in."""
        state = ckpt.load_checkpoint(self.accelerator, path, self.cfg)
        if "collapse_alarm" in state:
            self.alarm.load_state_dict(state["collapse_alarm"])
        epoch, step = state["epoch"], state.get("step", state["epoch"] * self.run.steps_per_epoch)
        where = f"epoch {epoch}" if step == epoch * self.run.steps_per_epoch else f"epoch {epoch + 1}, step {step}"
        self.accelerator.print(f"resumed from {path} ({where})")
        return epoch, step

    def train_epoch(self, epoch: int, first: int = 0) -> None:
        """Steps `first`.. of the epoch (0 unless resumed from a step checkpoint)."""
        self.run.method.train()
        spe = self.run.steps_per_epoch
        with tqdm(
            total=spe,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            dynamic_ncols=True,
            disable=not self.accelerator.is_local_main_process,
        ) as bar:
            self.interval_start, self.interval_steps = time.perf_counter(), 0
            batches = self.run.pipeline.batches(epoch, first) if first else self.run.pipeline.batches(epoch)
            for i, (views, labels) in enumerate(batches, start=first):
                step = epoch * spe + i
                names, values, lr = self.step(epoch, i, step, views, labels)
                bar.update(1)
                logged = None
                if (step + 1) % self.cfg.train.log_every_n_steps == 0 or i == spe - 1:
                    logged = self.log_step(epoch, step, lr, names, values, bar)
                for callback in self.callbacks:
                    callback.on_step_end(step + 1, logged)
                self.after_step(epoch, i, step + 1)

    def after_step(self, epoch: int, i: int, done: int) -> None:
        """A preemption signal (agreed by all processes): step checkpoint and stop; else the step cadence (the
        epoch's last step is end_epoch's, after the monitor)."""
        signum = self.stop.agreed()
        if signum:
            self.step_checkpoint(epoch, done)
            message = (
                f"stopped by {signal_name(signum)} after step {done}: checkpoint "
                f"{ckpt.step_dir(self.out, done)}; rerun the same command to resume"
            )
            if self.cfg.checkpoint.requeue and self.accelerator.is_main_process:
                message += f"; {requeue()}"
            # Printed and requeued before the last barrier: once one rank exits, torchrun terminates the others.
            self.accelerator.print(message)
            self.accelerator.wait_for_everyone()
            raise Stopped(signum, message, shown=True)
        every = self.cfg.checkpoint.every_n_steps
        if every and done % every == 0 and i != self.run.steps_per_epoch - 1:
            self.step_checkpoint(epoch, done)

    def step(self, epoch: int, i: int, step: int, views, labels) -> tuple[list[str], torch.Tensor, float]:
        """One optimiser step (and the online probe's); the logged numbers stay on the device."""
        run, cfg = self.run, self.cfg
        torch.manual_seed(sample_seed(cfg.seed, epoch, i, self.accelerator.process_index, _STEP_STREAM))
        lr = run.schedule.apply(run.optimizer, step)
        with feature_tap(run.inner.backbone) if run.online else nullcontext([]) as taps:
            names, values = train_step(
                run.method,
                run.optimizer,
                self.accelerator,
                views,
                step,
                run.schedule.total_steps,
                cfg.train,
            )
        if run.online is not None:
            # Detached features of the two global views only (their rows come first: the methods run the views in
            # order), not augment.local_crops' small crops; every process trains the same probe on the global rows.
            features = torch.cat(taps)[: 2 * len(labels)]
            run.online.train_step(*gather_rows(features, labels.repeat(2)), step, run.schedule.total_steps)
        loss = values[names.index("loss")]
        new_bad = (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(new_bad, step + 1, self.first_bad)
        self.first_bad_loss = torch.where(new_bad, loss, self.first_bad_loss)
        self.interval_steps += 1
        return names, values, lr

    def log_step(self, epoch: int, step: int, lr: float, names: list[str], values: torch.Tensor, bar) -> dict:
        """Read the numbers back (the one host synchronisation), stop on a non-finite loss, write the line."""
        self.raise_if_non_finite()
        metrics = global_metrics(self.accelerator, names, values)
        elapsed = time.perf_counter() - self.interval_start
        self.last = {
            "epoch": epoch + 1,
            "step": step + 1,
            "lr": lr,
            **metrics,
            "images_per_s": self.interval_steps * self.cfg.train.batch_size / max(elapsed, 1e-9),
        }
        if "z_std" in metrics and self.alarm.update(metrics["z_std"]):
            self.last["collapse_alarm"] = True
            self.accelerator.print(self.alarm.message(metrics["z_std"]))
        self.log.write(self.last)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", **self.postfix)
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        return self.last

    def raise_if_non_finite(self) -> None:
        bad = first_non_finite_step(self.accelerator, self.first_bad)
        if bad is None:
            return
        value = self.first_bad_loss.item() if self.first_bad.item() == bad else float("nan")
        raise NonFiniteLossError(
            f"loss is {value} at step {bad} (epoch {(bad - 1) // self.run.steps_per_epoch + 1}); training "
            f"stopped. Newest good checkpoint: {ckpt.latest_checkpoint(self.out) or 'none'}. Lower "
            "optim.base_lr or use train.max_grad_norm"
        )

    def end_epoch(self, done: int) -> None:
        """The monitor runs before the checkpoint: a run stopped between the two resumes from the previous
        checkpoint and monitors this epoch again, so each epoch's kNN line is written exactly once."""
        final = done == self.cfg.train.epochs
        every = self.cfg.monitor.every_n_epochs
        if self.monitor and (final or (every and done % every == 0)):
            self.monitor_epoch(done)
        every, every_step = self.cfg.checkpoint.every_n_epochs, self.cfg.checkpoint.every_n_steps
        at_step = every_step and done * self.run.steps_per_epoch % every_step == 0
        if final or (every and done % every == 0) or at_step:
            self.checkpoint(ckpt.epoch_dir(self.out, done).name, done, done * self.run.steps_per_epoch)
            self.export_backbone()

    def export_backbone(self) -> None:
        """Collective: backbone.safetensors from the main process; a failed write stops every process together."""
        path = self.out / ckpt.BACKBONE_FILE
        backbone = self.run.inner.backbone
        ckpt.write_on_main(self.accelerator, lambda: ckpt.export_backbone(backbone, path), path, self.stop.group)

    def monitor_epoch(self, done: int) -> None:
        result = self.monitor(self.run.inner.backbone, self.accelerator, self.eval_dtype, self.run.online)
        self.log.write({"epoch": done, "step": done * self.run.steps_per_epoch, **result})  # the main's result
        if not self.accelerator.is_main_process:
            return
        self.postfix = {"knn": f"{result['knn_top1']:.2f}"}
        line = f"epoch {done}: kNN top-1 {result['knn_top1']:.2f} top-5 {result['knn_top5']:.2f}"
        if "online_top1" in result:
            self.postfix["online"] = f"{result['online_top1']:.2f}"
            line += f", online linear top-1 {result['online_top1']:.2f}"
        self.accelerator.print(f"{line} ({result['knn_seconds']:.1f} s)")
        self.last.update(result)

    def step_checkpoint(self, epoch: int, done: int) -> None:
        """After global step `done` inside epoch `epoch` (0-based); the loss is checked first, as on log steps."""
        self.raise_if_non_finite()
        self.checkpoint(ckpt.step_dir(self.out, done).name, epoch, done)

    def checkpoint(self, name: str, epoch: int, step: int) -> None:
        """Signals are only recorded while it is written (a second Ctrl-C included): it completes or, killed,
        leaves a .tmp- directory that never counts."""
        state = {
            "epoch": epoch,
            "step": step,
            "model_signature": ckpt.model_signature(self.cfg),
            "collapse_alarm": self.alarm.state_dict(),
        }
        self.stop.writing = True
        try:
            staged = ckpt.stage_checkpoint(self.accelerator, self.out, state, name, self.stop.group)
            if self.accelerator.is_main_process:
                for callback in self.callbacks:
                    callback.on_checkpoint_staged(staged)
            ckpt.commit_checkpoint(self.accelerator, self.out, name, self.cfg.checkpoint.keep_last)
        finally:
            self.stop.writing = False

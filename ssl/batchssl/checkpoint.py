"""Run directory: config.yaml, metrics.jsonl, checkpoints/{epoch_NNNN,step_NNNNNNNN}/ (Accelerate save_state),
backbone.safetensors.

epoch_NNNN is written at the end of an epoch (after its monitor line); step_NNNNNNNN after global step N inside an
epoch (checkpoint.every_n_steps, or a preemption signal). All are ordered by the global step in their
trainer_state.json (an epoch checkpoint after a step checkpoint of the same step: it has the epoch's monitor line
too), and checkpoint.keep_last keeps the newest of both kinds together.

A checkpoint is written to checkpoints/.tmp-<name> and renamed when complete; only renamed directories that
hold trainer_state.json count, so a half-written checkpoint is never loaded and the previous one stays the newest.
A failed write (a full disk, any I/O error) removes the partial directory and ends in one line
(CheckpointWriteError, a UserError). On several processes the write is a collective with agreement: every process
catches its own failure (rank 0 writes the model and optimizer, every rank its RNG file), they compare after each
phase on a CPU group, and if any failed all of them raise the same error (only the main process's is printed).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from batchssl.config import Config, dotted_items, to_dict
from batchssl.errors import UserError
from batchssl.files import atomic_write, temp_path

STATE_FILE = "trainer_state.json"
BACKBONE_FILE = "backbone.safetensors"
_CHECKPOINT = re.compile(r"^(epoch|step)_(\d+)$")


def model_signature(cfg: Config) -> dict:
    """What must match for a checkpoint's weights to fit this run's model."""
    return {
        "dataset": cfg.data.name,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "stem": cfg.model.stem,
        "patch_size": cfg.model.patch_size,
        "method": cfg.method.name,
        "proj_hidden_dim": cfg.method.proj_hidden_dim,
        "proj_dim": cfg.method.proj_dim,
        "proj_layers": cfg.method.proj_layers,
        "pred_hidden_dim": cfg.method.pred_hidden_dim,
        "batchformer": cfg.batchformer.enabled,
        "batchformer_position": cfg.batchformer.position,
        "batchformer_nhead": cfg.batchformer.nhead,
    }


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def epoch_dir(output_dir: str | Path, epoch: int) -> Path:
    return checkpoint_dir(output_dir) / f"epoch_{epoch:04d}"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}"


def _order(path: Path, kind: str, number: int) -> tuple[int, int]:
    """(global step, 0 for a step checkpoint / 1 for an epoch one): the newest is the largest."""
    try:
        step = int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = number if kind == "step" else -1  # unreadable: load_checkpoint names the damage if it is chosen
    return step, int(kind == "epoch")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by global step, see the module docstring)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (_order(p, m.group(1), int(m.group(2))), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointWriteError(UserError):
    """A checkpoint (or the backbone file beside it) could not be written. Every process of the run raises it
    together with the same message; `quiet` on all but the main process, so that the run says it once."""


# torch.save's zip writer (optimizer.bin, every rank's RNG file) drops the errno of a failed write: on a full disk it
# raises RuntimeError("[enforce fail at inline_container.cc:...] . unexpected pos ...") or an iostream error.
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter", "iostream error")
_NEARLY_FULL = 2**20  # bytes: a write that failed with less free than this (or than a checkpoint) was a full disk


def _io_error(err: Exception) -> OSError | None:
    """The I/O failure behind an exception of a checkpoint write (errno None where the writer lost it), or None when
    it is no I/O failure (a bug, raised as it is)."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    if isinstance(err, SafetensorError) and any(s in text for s in ("Os {", "I/O error", "No space left")):
        # safetensors reports a failed write as its own error, the errno in its text ("os error 28")
        full = "No space left" in text or "os error 28" in text or "code: 28" in text
        return OSError(errno.ENOSPC if full else errno.EIO, text)
    if isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
        return OSError(None, text.strip().splitlines()[0])
    return None


def _failure_line(err: OSError, where: Path, what: str, need: int, kept: str) -> str:
    """One line for `what` ("a checkpoint", a file's name) that could not be written in `where`; `need`: about the
    bytes it takes (0: unknown); `kept`: what is still intact."""
    free = shutil.disk_usage(where).free if where.is_dir() else 0
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    if err.errno is None:  # torch lost the errno: the space left tells whether the disk filled up
        full = free < max(need, _NEARLY_FULL)
    if not full:
        reason = err.strerror or err
        return f"cannot write {what} in {where}: {reason}; {kept}. Rerun the same command to resume once it is fixed"
    size = f"{what} needs about {need / 2**20:.1f} MiB, " if need else ""
    return (
        f"no space left in {where}: {size}{free / 2**20:.1f} MiB free; {kept}. Free space (or lower "
        "checkpoint.keep_last) and rerun the same command to resume"
    )


def _write_failed(err: OSError, tmp: Path, output_dir: str | Path) -> str:
    """The one line for a checkpoint that could not be written; the partial directory is removed first."""
    older = complete_checkpoints(output_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"the newest complete checkpoint {older[-1].name} is intact" if older else "no earlier checkpoint exists"
    need = _dir_size(older[-1]) if older else 0  # a checkpoint's size hardly changes from one to the next
    return _failure_line(err, checkpoint_dir(output_dir), "a checkpoint", need, kept)


def _attempt(write) -> Exception | None:
    """Run `write()`; its exception, if any (an I/O failure is kept as OSError)."""
    try:
        write()
    except Exception as err:  # every process must reach the agreement, whatever happened to it
        return _io_error(err) or err
    return None


def _agree(accelerator, failure: Exception | None, group) -> tuple[int, Exception] | None:
    """Collective (on several processes; on one it only returns `failure`): (the first failing rank, its failure)
    on every process, or None when every process succeeded. An I/O failure travels as (errno, text); any other
    exception is re-raised on its own rank and named to the others."""
    if accelerator.num_processes == 1:
        return None if failure is None else (0, failure)
    mine = None
    if isinstance(failure, OSError):
        mine = ("io", failure.errno, failure.strerror or str(failure))
    elif failure is not None:
        mine = ("bug", None, f"{type(failure).__name__}: {failure}")
    everyone: list = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs is not None:
            if rank == accelerator.process_index:
                return rank, failure
            kind, code, text = theirs
            return rank, OSError(code, text) if kind == "io" else RuntimeError(f"rank {rank} failed: {text}")
    return None


def _raise_together(accelerator, failed: tuple[int, Exception], group, describe) -> None:
    """Collective: raise the agreed failure on every process; an I/O failure as one CheckpointWriteError whose
    message the main process makes (`describe(err)`, which may clean up) and sends to the others."""
    rank, err = failed
    if not isinstance(err, OSError):
        raise err  # a bug: its own traceback on its rank, named on the others
    message = [describe(err) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        dist.broadcast_object_list(message, src=0, group=group)
    raise CheckpointWriteError(message[0], quiet=not accelerator.is_main_process) from None


def stage_checkpoint(accelerator, output_dir: str | Path, state: dict, name: str, group=None) -> Path:
    """Collective: every process calls it. Writes the whole checkpoint (Accelerate's files, then `state` as
    trainer_state.json) into checkpoints/.tmp-<name> and returns it; `commit_checkpoint` puts it in place.
    An I/O failure on any process (a full disk) removes the partial directory and raises CheckpointWriteError on
    every process. `group`: a CPU (gloo) group of all processes for the agreement (None: the default group)."""
    tmp = temp_path(checkpoint_dir(output_dir) / name)
    main = accelerator.is_main_process

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_state() -> None:
        if main:
            atomic_write(tmp / STATE_FILE, json.dumps(state, indent=1))

    # Accelerate's save_state has no barrier of its own under DDP (only FSDP / DeepSpeed gather): a process that
    # failed can skip the rest, and each agreement doubles as the barrier between the phases.
    for phase in (prepare, lambda: accelerator.save_state(str(tmp)), write_state):
        failed = _agree(accelerator, _attempt(phase), group)
        if failed:
            _raise_together(accelerator, failed, group, lambda err: _write_failed(err, tmp, output_dir))
    return tmp


def write_on_main(accelerator, write, path: str | Path, group=None, need: int | None = None) -> None:
    """Collective: `write()` (of the file `path` in the run directory: the exported backbone, a line of
    metrics.jsonl) on the main process; an I/O failure raises CheckpointWriteError on every process, as a failed
    checkpoint does. `need`: the bytes the write takes, for the message (default: the size of the previous file)."""
    path = Path(path)
    failed = _agree(accelerator, _attempt(write) if accelerator.is_main_process else None, group)
    if failed:
        newest = latest_checkpoint(path.parent)
        kept = f"the checkpoint {newest.name} is complete" if newest else "no checkpoint exists yet"
        if need is None:
            need = path.stat().st_size if path.is_file() else 0

        def describe(err: OSError) -> str:
            temp_path(path).unlink(missing_ok=True)  # atomic_write's partial file
            return _failure_line(err, path.parent, path.name, need, kept)

        _raise_together(accelerator, failed, group, describe)


def commit_checkpoint(accelerator, output_dir: str | Path, name: str, keep_last: int) -> Path:
    """Collective: rename the staged checkpoint `name` into place (it becomes the newest) and prune all but
    the newest `keep_last`. Returns the final directory."""
    final = checkpoint_dir(output_dir) / name
    staged = temp_path(final)
    if accelerator.is_main_process:
        if final.exists():  # an earlier run's checkpoint of the same epoch (e.g. resume=<older checkpoint>)
            shutil.rmtree(final)
        os.replace(staged, final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep_last: int) -> Path:
    """Collective: stage and commit in one call. Returns the final directory."""
    name = epoch_dir(output_dir, state["epoch"]).name
    stage_checkpoint(accelerator, output_dir, state, name)
    return commit_checkpoint(accelerator, output_dir, name, keep_last)


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is incomplete or unreadable ({err})") from None


def load_checkpoint(accelerator, path: Path, cfg: Config) -> dict:
    """Restore model, optimizer, scaler and RNG states; refuse a checkpoint of another model."""
    state = read_state(path)
    theirs, ours = state.get("model_signature", {}), model_signature(cfg)
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs run {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise UserError(
            f"checkpoint {path} was written for another model ({'; '.join(diff)}): use another "
            "output_dir or checkpoint.resume=none with a fresh output_dir"
        )
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, SafetensorError, OSError, KeyError, ValueError, EOFError) as err:
        # The signature matched, so the model fits: the files themselves are damaged.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        older = [p for p in complete_checkpoints(path.parent.parent) if p != path]  # <run>/checkpoints/epoch_N
        way_out = (
            f"resume from the previous one with checkpoint.resume={older[-1]}"
            if older
            else "no older checkpoint is left: start afresh in another output_dir"
        )
        raise UserError(f"checkpoint {path} is damaged ({first[:200]}); {way_out}") from None
    return state


def export_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Frozen-backbone weights (no heads, no BatchFormer), written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True (never unpickles code).
    Accepts torchvision-style checkpoints: a nested 'state_dict'/'model' entry, a 'module.' prefix, an `fc` head."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of a user-supplied file is bad input
        raise UserError(f"cannot read backbone weights {path}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    return state


def load_backbone(backbone: nn.Module, path: str | Path) -> nn.Module:
    state = load_backbone_weights(path)
    expected = backbone.state_dict().keys()
    if all(k.startswith("vit.") for k in expected) and not any(k.startswith("vit.") for k in state):
        # torchvision VisionTransformer weights: ours wraps it as `vit` and has no classification head
        state = {f"vit.{k}": v for k, v in state.items() if not k.startswith("heads.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"weights in {path} do not match the architecture: {detail}") from None
    return backbone


LOCK_FILE = ".lock"


class RunLock:
    """One writer per run directory: an exclusive POSIX record lock (`fcntl.lockf`) on <run>/.lock, held while the
    process lives.

    The kernel drops the lock when its holder dies (kill -9 included), so a stale lock never blocks. A POSIX lock
    belongs to the process, not to the open file: forked loader workers do not inherit it (an flock would stay
    held by a killed trainer's orphaned workers for the seconds they take to notice, and refuse the rerun). The
    file only carries the holder's pid and host for the message a second writer gets.
    """

    def __init__(self, run_dir: str | Path, purpose: str):
        self.run_dir, self.purpose, self._file = Path(run_dir), purpose, None

    def acquire(self) -> RunLock:
        import fcntl
        import socket

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run directory {self.run_dir}: {err.strerror or err}") from None
        path = self.run_dir / LOCK_FILE
        try:
            handle = open(path, "a+")  # noqa: SIM115 -- held open on purpose: the lock lives as long as the file
        except OSError as err:
            raise UserError(f"cannot write in the run directory {self.run_dir}: {err.strerror or err}") from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{self.run_dir} is in use by {holder}: wait for it to finish or use another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.purpose} (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        os.chmod(path, 0o644)
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = "config_history.jsonl"
# Settings that change neither the model nor the training trajectory: free to change on resume.
FREE_TO_CHANGE = {
    "output_dir",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.val_limit",
    "data.decode",  # the same crop boxes decoded elsewhere: rounding only, as another machine's kernels
    "checkpoint.every_n_epochs",
    "checkpoint.every_n_steps",
    "checkpoint.signals",
    "checkpoint.requeue",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.allow_changes",
    "train.log_every_n_steps",
    "train.log_with",
    "monitor.every_n_epochs",
    "monitor.k",
    "monitor.temperature",
    "monitor.batch_size",
    "monitor.enabled",
    "monitor.collapse_fraction",
    "monitor.collapse_patience",
}
FREE_SECTIONS = ()


def config_changes(cfg: Config, previous: dict) -> list[str]:
    """'key: old -> new' for every setting that differs from `previous` and may change the model or trajectory."""
    ours, theirs = dotted_items(to_dict(cfg)), dotted_items(previous)
    # A key the recorded config lacks came with a later version of batchssl: the run had the behaviour of its
    # default (a new setting's default keeps the old behaviour), so it compares as that; a key that no longer
    # exists changes nothing.
    defaults = dotted_items(to_dict(Config()))
    theirs = {k: theirs[k] if k in theirs else defaults.get(k) for k in ours}
    return [
        f"{k}: {theirs[k]!r} -> {ours[k]!r}"
        for k in sorted(ours)
        if ours[k] != theirs[k] and k not in FREE_TO_CHANGE and not k.startswith(FREE_SECTIONS)
    ]


def check_config_change(cfg: Config, output_dir: str | Path, resume_from: Path | None) -> None:
    """Refuse to resume with settings that alter the model or the trajectory, unless checkpoint.allow_changes."""
    import yaml

    path = Path(output_dir) / CONFIG_FILE
    if resume_from is None or not path.is_file() or cfg.checkpoint.allow_changes:
        return
    previous = yaml.safe_load(path.read_text()) or {}
    changes = config_changes(cfg, previous)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise UserError(
            f"{output_dir} was trained with other settings ({shown}): resuming would mix two runs. "
            "Use another output_dir, or add checkpoint.allow_changes=true to continue with the new ones"
        )


def record_config(cfg: Config, output_dir: str | Path, resume_from: Path | None) -> None:
    """config.yaml is the config that runs now; config_history.jsonl keeps every config that ran, with when and
    from which checkpoint, so the directory always tells the truth about its checkpoints."""
    import datetime

    import yaml

    out = Path(output_dir)
    tree = to_dict(cfg)
    atomic_write(out / CONFIG_FILE, yaml.safe_dump(tree, sort_keys=False))
    entry = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": str(resume_from) if resume_from else None,
        "config": tree,
    }
    with (out / CONFIG_HISTORY).open("a") as f:
        f.write(json.dumps(entry) + "\n")

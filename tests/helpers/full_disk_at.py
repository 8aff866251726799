"""pretrain.py whose disk fills up on one rank while it writes one checkpoint (tests/test_preemption.py).

    python tests/helpers/full_disk_at.py --checkpoint step_00000002 --rank 1 [pretrain.py's arguments]

On that rank, the first file it writes into checkpoints/.tmp-<checkpoint> (rank 0: model.safetensors, through
safetensors; another rank: its RNG file random_states_<rank>.pkl, through torch.save) gets half its bytes and
then the error a full disk gives there: safetensors' SafetensorError "... No space left on device (os error 28)",
or OSError ENOSPC. Everything else is pretrain.py's main: the config, the process tuning, train(), and a UserError
as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

import accelerate.utils.other
import torch
from safetensors import SafetensorError

from batchssl.config import DEFAULT_RECIPE, load_config
from batchssl.cpu import tune_process
from batchssl.errors import exit_on_user_error
from batchssl.train import train

REPO = Path(__file__).resolve().parents[2]


def fill_disk_at(checkpoint: str) -> None:
    """Patch this process's two checkpoint writers so that the first file written into `checkpoint` fails."""
    failed = []

    def fails(path) -> bool:
        if failed or Path(path).parent.name != f".tmp-{checkpoint}":
            return False
        failed.append(path)
        Path(path).write_bytes(b"\0" * 1000)  # what a full disk leaves: a partial file
        return True

    safe_save_file, torch_save = accelerate.utils.other.safe_save_file, torch.save

    def save_file(tensors, filename, *args, **kwargs):
        if fails(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return safe_save_file(tensors, filename, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and fails(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return torch_save(obj, f, *args, **kwargs)

    accelerate.utils.other.safe_save_file = save_file
    torch.save = save


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="the checkpoint's name, e.g. step_00000002")
    parser.add_argument("--rank", type=int, required=True, help="the rank whose write fails (torchrun's RANK)")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    with exit_on_user_error("pretrain.py"):
        cfg = load_config(args.config or REPO / DEFAULT_RECIPE, args.overrides)
        tune_process(cfg)
        if args.rank == int(os.environ.get("RANK", "0")):
            fill_disk_at(args.checkpoint)
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])

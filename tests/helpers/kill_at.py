"""pretrain.py that SIGKILLs itself at an exact moment: a deterministic stand-in for `kill -9` (tests/test_resume.py).

    python tests/helpers/kill_at.py --step N [pretrain.py's arguments]        # right after global step N (1-based)
    python tests/helpers/kill_at.py --checkpoint N [pretrain.py's arguments]  # half way through writing epoch N's
                                                                              # checkpoint (staged, not renamed)

Under torchrun: --rank R acts on that rank only (the others go on), --first-attempt only on torchrun's first attempt
(TORCHELASTIC_RESTART_COUNT 0: the restarted group runs through), and --send NAME sends that signal (SIGUSR1, as
Slurm would, to this one process) instead of SIGKILL.

It does what pretrain.py's main does (the config, the process tuning, train()) with a batchssl.train.Callback that
kills the process; the rerun that resumes is plain pretrain.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from batchssl.config import DEFAULT_RECIPE, load_config
from batchssl.cpu import tune_process
from batchssl.train import Callback, train

REPO = Path(__file__).resolve().parents[2]


class KillAt(Callback):
    def __init__(self, step: int | None, checkpoint: int | None, sig: signal.Signals = signal.SIGKILL):
        self.step, self.checkpoint, self.sig = step, checkpoint, sig

    def die(self) -> None:
        os.kill(os.getpid(), self.sig)

    def on_step_end(self, step: int, logged: dict | None) -> None:
        if step == self.step:
            self.die()

    def on_checkpoint_staged(self, path: Path) -> None:
        if self.checkpoint is not None and path.name.endswith(f"epoch_{self.checkpoint:04d}"):
            self.die()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--step", type=int)
    when.add_argument("--checkpoint", type=int, help="the epoch whose checkpoint is being written")
    parser.add_argument("--rank", type=int, help="only on this rank (torchrun's RANK)")
    parser.add_argument("--first-attempt", action="store_true", help="only when TORCHELASTIC_RESTART_COUNT is 0")
    parser.add_argument("--send", default="SIGKILL", help="the signal to send this process (default SIGKILL)")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config or REPO / DEFAULT_RECIPE, args.overrides)
    tune_process(cfg)
    acts = args.rank in (None, int(os.environ.get("RANK", "0")))
    acts = acts and not (args.first_attempt and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0)
    train(cfg, callbacks=[KillAt(args.step, args.checkpoint, signal.Signals[args.send])] if acts else [])


if __name__ == "__main__":
    main(sys.argv[1:])

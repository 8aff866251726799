"""What the tests share: the repository's path, a tiny Fashion-MNIST run, the one way to run an entry point in a
subprocess (`run_entry`), the in-process equivalents, and readers of a run's metrics.

Tests import it as `from helpers import ...` (pytest puts tests/ on sys.path). The scripts beside this file
(extract_2proc.py, grads_2proc.py, probe_2proc.py) run under torchrun by path; extract_2proc and probe_2proc are
also imported by their tests (`from helpers import probe_2proc`), so both sides build the same model and data.

A subprocess costs seconds of imports (torch, Accelerate) before any work: tests launch one only where the process
boundary is what they check (exit status and stderr of a CLI, a kill, a lock held by another process, torchrun,
`accelerate launch`). Everything else calls the same functions in this process (`pretrain_in_process`, the
evaluators' `main(argv)`) inside `own_process_state()`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A Fashion-MNIST run small enough for tests: 256 images (4 steps of 64), a 200-image validation split, one epoch.
# Everything else, loader workers included, is the recipe's own setting.
TINY = [
    "data.limit=256",
    "data.val_limit=200",
    "train.epochs=1",
    "train.batch_size=64",
    "train.log_every_n_steps=1",
    "monitor.batch_size=256",
]

LAUNCHERS = ("python", "torchrun", "accelerate")


# The default recipe shrunk to take seconds in process: 16 px images in batches of 16, a 1/8-width ResNet-18 with
# small heads, two epochs. With `fake_fashion_mnist_split` it reads nothing from disk.
SHRUNK = [
    "train.epochs=2",
    "train.batch_size=16",
    "train.log_every_n_steps=1",
    "data.image_size=16",
    "model.width=0.125",
    "method.proj_hidden_dim=64",
    "method.proj_dim=32",
]


def fake_fashion_mnist_split(train_images: int, test_images: int = 32):
    """A stand-in for `batchssl.data.load_split`: random uint8 28 x 28 images, labels 0..9 in turn, `train_images`
    in the training split (pretraining and the kNN bank) and `test_images` other images in the test split."""
    import numpy as np

    from batchssl.data import ArrayImages

    def load_split(cfg, split):
        rng = np.random.default_rng(1 if split == "test" else 0)
        n = test_images if split == "test" else train_images
        return ArrayImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)

    return load_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(
    *argv: str | Path,
    launcher: str = "python",
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point from the repository root and capture its output (text).

    argv: a script and its arguments ("pretrain.py", "--plan", ...) or a module ("-m", "knn_eval", "--run", ...).
    launcher: "python" (one process); "torchrun" (two processes on gloo, one thread each); "accelerate"
    (`accelerate launch` as the README runs it; its own flags go first in argv, e.g. "--num_processes", "1").
    env: added to this process's environment; a value None removes the variable.
    check: a non-zero exit fails the test with the command and the tail of its stderr.
    """
    argv = [str(a) for a in argv]
    if launcher == "python":
        cmd = [sys.executable, *argv]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *argv,
        ]
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
    elif launcher == "accelerate":
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *argv]
    else:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} ({launcher}) exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def run_pretrain(
    args, nproc: int = 1, timeout: float = 600, check: bool = True, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """`run_entry("pretrain.py", *args)`: one process, or two under torchrun (nproc=2)."""
    return run_entry(
        "pretrain.py", *args, launcher="torchrun" if nproc == 2 else "python", timeout=timeout, check=check, env=env
    )


@contextmanager
def own_process_state(threads: int = 1):
    """Accelerate's process-wide state reset before and after, torch's global generator and thread count restored:
    what an in-process train() or evaluator sets up does not leak into the next test. One thread meanwhile: the
    tests' tensors are tiny, and a second OpenMP thread only waits on a busy machine."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(before)
        AcceleratorState._reset_state(reset_partial_state=True)


def pretrain_in_process(args, threads: int = 1) -> dict:
    """What `python pretrain.py [--config RECIPE] key=value ...` trains, in this process (without the entry point's
    process-wide tuning), on `threads` CPU threads; returns train()'s last logged line. A run compared bit for bit
    with a subprocess's must use the subprocess's thread count (OMP_NUM_THREADS): a loss's last bits depend on it."""
    from batchssl.config import DEFAULT_RECIPE, load_config
    from batchssl.train import train

    args = [str(a) for a in args]
    recipe = REPO / DEFAULT_RECIPE
    if args[:1] == ["--config"]:
        recipe, args = REPO / args[1], args[2:]
    with own_process_state(threads):
        return train(load_config(recipe, args))


def main_in_process(main, argv, expect: int = 0) -> str:
    """An entry point's `main(argv)` (pretrain.py's, knn_eval's, linear_probe's, batchssl.report's) in this
    process; returns what it wrote to stderr. Its exit status must be `expect` (0: it returned; else SystemExit's
    code, 2 for a UserError or a bad argument), or the test fails with that stderr's tail."""
    err = io.StringIO()
    code = 0
    with own_process_state(), redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    assert code == expect, f"main({argv}) exited with {code}, not {expect}:\n{err.getvalue()[-4000:]}"
    return err.getvalue()


_SCRIPTS: dict[str, object] = {}


def load_script(path: str):
    """A script of the repository (pretrain.py, benchmarks/quality.py) imported as a module, once."""
    import importlib.util

    if path not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def step_losses(run_dir: Path) -> dict[int, float]:
    """{global step: loss} of the step lines; a step logged twice would keep only its last value, so callers that
    care about duplicates also count the lines (see `step_lines`)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def step_lines(run_dir: Path) -> list[int]:
    """The global step of every step line, in file order (repeats included)."""
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def knn_lines(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, top-1, top-5) of every kNN monitor line, in file order (repeats included)."""
    return [(m["epoch"], m["knn_top1"], m["knn_top5"]) for m in read_metrics(run_dir) if "knn_top1" in m]


# Two-process tests: a lost peer shows as a closed connection at once; the timeout only bounds a hang if it did not.
DIST_ENV = {"BATCHSSL_DIST_TIMEOUT_S": "120"}


def rank_exit_codes(stderr: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's failure summary."""
    import re

    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}

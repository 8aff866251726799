"""What the tests share: the repository's path, a tiny Fashion-MNIST run, the real entry points in subprocesses
(one process, or two under torchrun on gloo) and readers of a run's metrics.

Tests import it as `from helpers import ...` (pytest puts tests/ on sys.path). The scripts beside this file
(extract_2proc.py, grads_2proc.py, probe_2proc.py) run under torchrun by path; extract_2proc and probe_2proc are
also imported by their tests (`from helpers import probe_2proc`), so both sides build the same model and data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A Fashion-MNIST run small enough for tests: 256 images (4 steps of 64), a 200-image validation split, one epoch.
# Everything else, loader workers included, is the recipe's own setting.
TINY = ["data.limit=256", "data.val_limit=200", "train.epochs=1", "train.batch_size=64",
        "train.log_every_n_steps=1", "monitor.batch_size=256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, *args: str, timeout: int = 300,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 script args` on gloo (one thread per process); the caller checks the result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_pretrain(args, nproc: int = 1, timeout: int = 600, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """pretrain.py in one process, or in two under torchrun (nproc=2); `env` is added to this one's environment."""
    if nproc == 2:
        result = run_torchrun("pretrain.py", *args, timeout=timeout, env=env)
    else:
        result = subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


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

"""Shared helpers: run the real entry points in subprocesses (one process, or two with torchrun on gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A Fashion-MNIST run small enough for tests: a few hundred images, no loader workers.
TINY = ["data.limit=256", "data.val_limit=200", "data.num_workers=0", "train.epochs=1", "train.batch_size=64",
        "train.log_every_n_steps=1", "monitor.batch_size=256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 script args` on gloo (one thread per process); the caller checks the result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_pretrain(args, nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """pretrain.py in one process, or in two under torchrun (nproc=2)."""
    if nproc == 2:
        result = run_torchrun("pretrain.py", *args, timeout=timeout)
    else:
        result = subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture
def repo() -> Path:
    return REPO

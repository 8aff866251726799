"""CPU-only tuning of the training process: threads, malloc, bf16 support.

`tune_process(cfg)` is the one place that changes process-wide state (thread count, OMP_NUM_THREADS, glibc's
malloc): entry points (pretrain.py) call it once, before they build anything; importing this module, or calling
batchssl.train.train() from a program or a test, changes nothing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> str:
    """Keep freed memory in glibc's heap instead of returning it to the kernel, so that each training step does not
    page-fault its activations in afresh (mmap threshold at its 32 MiB maximum, no trimming); the heap stays at
    its peak. benchmarks/train_throughput.py --mallopt measures what it gives."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        ok = False
    return "mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB-1)" if ok else "mallopt unavailable (not glibc)"


def _ancestors(levels: int = 4) -> list[tuple[list[str], dict[str, str]]]:
    """(command line, environment) of the parent processes, nearest first (Linux /proc; [] elsewhere)."""
    found, pid = [], os.getppid()
    for _ in range(levels):
        proc = Path(f"/proc/{pid}")
        try:
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
            env = dict(
                item.split(b"=", 1) for item in proc.joinpath("environ").read_bytes().split(b"\0") if b"=" in item
            )
            status = proc.joinpath("status").read_text()
        except OSError:
            break
        found.append(
            (
                [a.decode(errors="replace") for a in argv if a],
                {k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()},
            )
        )
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if pid <= 1:
            break
    return found


def accelerate_forced_one_thread() -> bool:
    """True when `accelerate launch` set OMP_NUM_THREADS=1 on its own: its default for a launch without `--cpu`
    on a machine without GPUs, which runs the trainer on one core. False when the user asked for the thread
    count (OMP_NUM_THREADS in the launcher's environment, or --num_cpu_threads_per_process)."""
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return False
    for argv, env in _ancestors():
        if any("accelerate" in Path(a).name for a in argv[:2]) and "launch" in argv:
            asked = "OMP_NUM_THREADS" in env or any(a.startswith("--num_cpu_threads_per_process") for a in argv)
            return not asked
    return False


def use_all_cores(local_processes: int, loader_workers: int = 0) -> int | None:
    """Give this process its share of the cores when accelerate launch forced one thread; returns the new
    thread count, or None when the user's (or the launcher's) setting stands. Loader workers that run beside the
    training step (data.pipeline workers) take their cores out of the share: OpenMP threads that lose their core
    to a busy worker stall at every barrier."""
    import torch

    if not accelerate_forced_one_thread():
        return None
    threads = max(1, (os.cpu_count() or 1) // max(1, local_processes) - loader_workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything the trainer starts (FAISS reads it too)
    return threads


def training_on_cpu() -> bool:
    """Whether the trainer's Accelerator will pick the CPU (no GPU or other accelerator present)."""
    import torch

    accelerators = [
        torch.cuda.is_available(),
        torch.backends.mps.is_available(),
        hasattr(torch, "xpu") and torch.xpu.is_available(),
    ]
    return not any(accelerators)


def tune_process(cfg) -> list[str]:
    """Process-wide tuning for a pretraining run on this machine, done once by the entry point; returns what it
    changed, one description each.

    - Threads: `accelerate launch` without --cpu forces one thread per process on a machine without GPUs; the cores
      are then divided among this machine's processes, less the loader workers that run beside the step.
    - On the CPU, glibc keeps freed memory in its heap (`tune_malloc`)."""
    from batchssl.build import uses_loader_workers

    done = []
    workers = cfg.data.num_workers if uses_loader_workers(cfg) else 0
    threads = use_all_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), workers)
    if threads:
        done.append(f"{threads} CPU threads (accelerate launch had set 1)")
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(
                f"accelerate launch set 1 CPU thread per process; using {threads} "
                "(set OMP_NUM_THREADS or --num_cpu_threads_per_process to choose)"
            )
    if training_on_cpu():
        done.append(tune_malloc())
    return done


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is emulated and
    slower than fp32."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def effective_precision(requested: str, on_cpu: bool) -> str:
    """The precision a run really uses: bf16 on a CPU without native bf16 would be emulated and slower than fp32,
    so it runs fp32 ('no'). The trainer, its monitor and the evaluators all go through this, so they agree."""
    if requested == "bf16" and on_cpu and not native_bf16():
        return "no"
    return requested

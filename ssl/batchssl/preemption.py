"""Preemption: SIGTERM / SIGUSR1 (checkpoint.signals) and Ctrl-C stop a run at a step boundary, resumable.

Slurm and spot instances send a signal some time (KillWait, --signal=USR1@120) before they kill a job, and the
signal may reach one process of the group or all of them, torchrun's agent forwarding it once more. The handler
only records the first signal; after every step the processes agree on it (a MAX all-reduce of one integer on a
CPU gloo group: no device synchronisation), so all of them write the same step checkpoint and exit together with
EXIT_BASE + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C), as a shell reports a process
killed by that signal. Rerunning the same command resumes from that checkpoint exactly.

A repeated signal is a no-op (the first one is already being served), also while the checkpoint is written, so a
second signal cannot leave a half-written checkpoint (and the write is atomic by rename anyway). A second Ctrl-C
outside a checkpoint write stops at once: the previous checkpoint stands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from batchssl.errors import UserError

EXIT_BASE = 128


def parse_signals(names: str) -> list[signal.Signals]:
    """checkpoint.signals ("SIGTERM,SIGUSR1") as signals; UserError names a bad one."""
    found = []
    for name in (n.strip().upper() for n in names.split(",") if n.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal, name) or name.startswith("SIG_"):
            raise UserError(f"checkpoint.signals: {name} cannot be handled (use names such as SIGTERM,SIGUSR1)")
        found.append(signal.Signals[name])
    return found


class Stopped(SystemExit):
    """Raised by train() once a signal's checkpoint is written (or at a second Ctrl-C); its code is the exit
    status, EXIT_BASE + the signal's number. A SystemExit, so entry points exit with it and print no traceback."""

    def __init__(self, signum: int, message: str, shown: bool = False):
        super().__init__(EXIT_BASE + signum)
        self.signum, self.message, self.shown = signum, message, shown


class StopRequests:
    """The run's signal handlers (installed for the duration of train(), main thread only) and the agreement
    of the processes on whether to stop."""

    def __init__(self, names: str, world: int):
        self.signals = list(dict.fromkeys([*parse_signals(names), signal.SIGINT]))
        self.world, self.signum, self.writing = world, 0, False
        self._previous: dict = {}
        self._group = None

    def install(self) -> StopRequests:
        """Collective on several processes (it makes the flag's gloo group): every process calls it."""
        if self.world > 1:
            self._group = dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def group(self):
        """The processes' CPU (gloo) group (None with one process): also what a failed checkpoint write is agreed on
        (batchssl.checkpoint.stage_checkpoint)."""
        return self._group

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def leave(self) -> None:
        """Several processes, stopping after the checkpoint: the first rank to exit makes torchrun's agent SIGTERM
        the others, which may still be on their way out (releasing the lock, tearing down the interpreter, where
        Python resets its own handlers to the default); a rank that has agreed to stop ignores the signals from now
        on and exits with the agreed code instead of as killed."""
        self._previous = {}  # nothing to restore: the process is leaving
        ignore_signals({*self.signals, signal.SIGTERM})

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT and not self.writing:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum == 0:
            self.signum = signum

    def agreed(self) -> int:
        """Collective: the signal any process received (the largest number if several), 0 when none."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.signum = self.signum or int(flag.item())  # a later local signal is then a repeat
        return int(flag.item())


def ignore_signals(signals) -> None:
    """Ignore `signals` from now on (main thread only: Python handles signals there). For a process on its way out
    with the rest of its group, which torchrun's agent SIGTERMs once the first of them has exited."""
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)


def join_restarted_group() -> None:
    """Under torchrun's elastic restarts (--max-restarts), the restarted workers' process group is formed here,
    before Accelerate would form it. The workers share the agent's store across attempts and torch writes the
    group's addresses under the same keys every attempt, so a restarted worker may read a dead peer's address
    and fail to connect ("Connection refused"); the attempt's own key prefix keeps the attempts apart. The first
    attempt and every other launch are left to Accelerate."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    from datetime import timedelta

    from batchssl.launch import group_timeout

    timeout = group_timeout() or timedelta(minutes=30)  # torch's default for gloo
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"batchssl/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timeout,
    )


def requeue() -> str:
    """`scontrol requeue $SLURM_JOB_ID` (checkpoint.requeue): the line to print about it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "checkpoint.requeue=true but SLURM_JOB_ID is not set (not a Slurm job): not requeued"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job} failed ({err}); requeue the job by hand"
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return f"scontrol requeue {job} failed ({detail[0] if detail else done.returncode}); requeue it by hand"
    return f"requeued Slurm job {job}"

"""scripts/slurm/pretrain.sbatch run by bash with stub srun, scontrol, nvidia-smi and python on PATH: the launcher
command line each node would run (torchrun's options, through batchssl.launch), from the variables Slurm sets."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import REPO
from helpers.slurm_stubs import install_stubs

SCRIPT = REPO / "scripts" / "slurm" / "pretrain.sbatch"


def run_sbatch(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict[int, list[str]]]:
    bin_dir, out = install_stubs(tmp_path / "bin"), tmp_path / "out"
    out.mkdir(exist_ok=True)
    slurm = {
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "NPROC_PER_NODE", "PYTHON")
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **clean,
            **slurm,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_OUT": str(out),
            **env,
        },
    )
    nodes = {int(p.name.removeprefix("node")): p.read_text().split("\0")[:-1] for p in out.glob("node*")}
    return result, nodes


def torchrun_options(argv: list[str]) -> dict[str, str]:
    """{--option: value} of `python -m batchssl.launch --a x --b y pretrain.py ...` (torchrun's options)."""
    assert argv[:2] == ["-m", "batchssl.launch"], argv
    options = argv[2 : argv.index("pretrain.py")]
    return dict(zip(options[::2], options[1::2]))


def test_each_node_runs_one_torchrun_with_the_job_s_node_rank_master_and_gpus(tmp_path):
    args = ["--config", "recipes/imagenet/mocov3_r50_bf.yaml", "output_dir=runs/with space"]
    result, nodes = run_sbatch(tmp_path, *args, STUB_GPUS="4")
    assert result.returncode == 0, result.stderr
    assert sorted(nodes) == [0, 1]
    for rank, argv in nodes.items():
        assert torchrun_options(argv) == {
            "--nnodes": "2",
            "--node-rank": str(rank),
            "--nproc-per-node": "4",
            "--master-addr": "gpu07",
            "--master-port": "29500",
            "--rdzv-conf": "timeout=600",
            "--signals-to-handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout": "110",
        }
        assert argv[argv.index("pretrain.py") + 1 :] == args  # every node gets the same arguments, quoting intact
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "scontrol show hostnames gpu[07-08]" in calls
    sruns = [c for c in calls if c.startswith("srun ")]
    assert len(sruns) == 1 and sruns[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
    assert "2 nodes x 4 processes, rank 0 on gpu07:29500" in result.stdout


def test_slurm_gpu_count_and_user_settings_win_over_nvidia_smi(tmp_path):
    _, nodes = run_sbatch(
        tmp_path, STUB_GPUS="4", SLURM_GPUS_ON_NODE="8", MASTER_PORT="31000", TORCHRUN_SHUTDOWN_S="50"
    )
    options = torchrun_options(nodes[1])
    assert (options["--nproc-per-node"], options["--master-port"], options["--shutdown-timeout"]) == (
        "8",
        "31000",
        "50",
    )
    _, nodes = run_sbatch(tmp_path, STUB_GPUS="4", SLURM_GPUS_ON_NODE="8", NPROC_PER_NODE="2")
    assert torchrun_options(nodes[0])["--nproc-per-node"] == "2"


def test_no_gpu_stops_with_one_line_before_srun(tmp_path):
    result, nodes = run_sbatch(tmp_path, STUB_GPUS="0")
    assert result.returncode == 2 and not nodes
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("pretrain.sbatch: error: no GPU found on ")


@pytest.mark.parametrize("option", ["--signal=USR1@120", "--requeue", "--open-mode=append", "--ntasks-per-node=1"])
def test_sbatch_asks_for_the_warning_signal_and_requeue(option):
    assert re.search(rf"^#SBATCH {re.escape(option)}$", SCRIPT.read_text(), re.MULTILINE)


def test_torchrun_accepts_the_node_command_and_its_rendezvous_is_the_job_s_first_host(tmp_path):
    from torch.distributed.run import get_args_parser

    from batchssl.launch import rendezvous_summary

    _, nodes = run_sbatch(tmp_path, "--config", "recipes/imagenet/simsiam.yaml", STUB_GPUS="8")
    args = get_args_parser().parse_args(nodes[1][2:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.rdzv_backend) == ("2", 1, "8", "static")
    assert (args.training_script, args.training_script_args) == (
        "pretrain.py",
        ["--config", "recipes/imagenet/simsiam.yaml"],
    )
    assert rendezvous_summary(args) == ("gpu07:29500", "timeout", "600")

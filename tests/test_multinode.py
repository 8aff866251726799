"""Two "nodes" on this machine: two torchrun invocations joined by a c10d rendezvous, as on a cluster (one command
per node), against two processes started by one torchrun on one node.

Both runs have two processes, each with half the global batch and the same gloo reductions, so their losses agree
to float rounding at every step, with the recipe's own precision settings (bf16 autocast where the CPU has native
bf16, else float32; channels_last). That two
processes give one process's losses is tests/test_distributed.py's subject. What only the two-node launch can get
wrong is what depends on the node: both processes have LOCAL_RANK 0 and node ranks from the rendezvous, so a data
shard, a seed, a log line or a file chosen by local rank instead of global rank shows here as another loss or a
duplicated line.
A node that never joins: `python -m batchssl.launch` (torchrun with the same options) ends with one line.
"""

import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, free_port, run_pretrain, step_lines, step_losses

RUN = [
    "--config",
    "recipes/fashion_mnist/mocov3_bf.yaml",
    *TINY,
    "batchformer.gather=true",
    "batchformer.dropout=0.0",
    "monitor.enabled=false",
]


def two_node_command(node_rank: int, port: int) -> list[str]:
    """What a user types on node `node_rank` (README, "N nodes"), with this machine as both nodes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-conf",
        "join_timeout=120",
        "pretrain.py",
    ]


def run_two_nodes(args: list[str], logs, timeout: float = 300) -> None:
    """Both launches at once; their output goes to files (a full pipe would stall one node and so both)."""
    port, procs = free_port(), []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        for node in (0, 1):
            with open(logs / f"node{node}.log", "w") as log:  # the child keeps its own copy of the descriptor
                procs.append(
                    subprocess.Popen(
                        [*two_node_command(node, port), *args],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            time.sleep(1)  # node 0 first, so that it hosts the rendezvous store
        deadline = time.monotonic() + timeout
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0, 0]:
        tails = "\n".join((logs / f"node{n}.log").read_text()[-2000:] for n in (0, 1))
        raise AssertionError(f"two-node launch exited {codes}:\n{tails}")


@pytest.mark.slow
def test_two_nodes_give_the_losses_of_two_processes_on_one_node(tmp_path):
    run_two_nodes([*RUN, f"output_dir={tmp_path / 'nodes'}"], tmp_path)
    run_pretrain([*RUN, f"output_dir={tmp_path / 'node'}"], nproc=2)
    nodes, node = step_losses(tmp_path / "nodes"), step_losses(tmp_path / "node")
    assert step_lines(tmp_path / "nodes") == [1, 2, 3, 4]  # one writer: no step logged by both nodes
    assert nodes == pytest.approx(node, rel=1e-6)
    assert (tmp_path / "nodes" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_a_node_that_never_joins_ends_with_one_line_naming_the_endpoint_and_timeout(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "batchssl.launch", *two_node_command(0, port)[3:]]
    cmd[cmd.index("join_timeout=120")] = "join_timeout=2"
    result = subprocess.run(
        [*cmd, *RUN, f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith(
        f"batchssl.launch: error: not every node joined the rendezvous at "
        f"127.0.0.1:{port} within 2 s (--nnodes 2; torchrun --rdzv-conf join_timeout="
    )
    assert not any(tmp_path.iterdir())  # no training process started: nothing written


def test_group_timeout_is_seconds_from_the_environment(monkeypatch):
    import datetime

    from batchssl.errors import UserError
    from batchssl.launch import TIMEOUT_ENV, group_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert group_timeout() is None  # torch's default
    monkeypatch.setenv(TIMEOUT_ENV, "90.5")
    assert group_timeout() == datetime.timedelta(seconds=90.5)
    for bad in ("0", "-3", "ten", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=f"^{TIMEOUT_ENV}={bad} must be a number of seconds > 0$"):
            group_timeout()


@pytest.mark.slow
def test_a_process_whose_group_never_forms_ends_with_one_line(tmp_path):
    # Processes started without a launcher's rendezvous (srun or mpirun starting pretrain.py itself): rank 0 of 2
    # alone waits for the other at MASTER_ADDR:MASTER_PORT for BATCHSSL_DIST_TIMEOUT_S, then stops.
    port = free_port()
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "BATCHSSL_DIST_TIMEOUT_S": "2",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "pretrain.py", *RUN, f"output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"pretrain.py: error: the 2 processes of this run did not all join the process group at 127.0.0.1:{port} "
            "within 2 s (BATCHSSL_DIST_TIMEOUT_S): "
        )
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _comm_on_paper():
    import importlib.util

    spec = importlib.util.spec_from_file_location("comm_on_paper", REPO / "benchmarks" / "comm_on_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_scale_on_paper_counts_by_hand():
    """benchmarks/comm_on_paper.py on numbers worked out by hand."""
    from batchssl.config import load_config

    comm = _comm_on_paper()
    # 1 M float32 gradients over a ring of 8 GPUs: 2 x 7/8 x 4 MB = 7 MB per GPU, 0.56 ms at 100 Gb/s (12.5 GB/s).
    tiny = comm.Census(trainable_params=1_000_000, key_gathers=[], bf_gathers=[], bn_forward=[], bn_backward=[])
    row = comm.step_seconds(tiny, global_batch=256, gpus=8, gbps=100, hop_us=5.0, compute_s=1e-3)
    assert row["bytes"]["grad"] == pytest.approx(7e6) and row["seconds"]["grad"] == pytest.approx(0.56e-3)
    assert row["efficiency"] == pytest.approx(1.0)  # the all-reduce hides behind a longer backward
    # The default recipe's model (ResNet-18 + MoCo v3 heads): ResNet-18 has 20 batch norms (stem, 2 per basic block,
    # 3 downsamples), run on 2 views by the online and the momentum encoder (80 calls), the projector's 2 by both
    # (8), the predictor's 1 on the online side (2); gradients flow through the online ones (40 + 4 + 2). Keys: one
    # all-gather per (query, key) pair of the loss, 128 float32 values per image, twice with BatchFormer's stream.
    cfg = load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", ["batchformer.enabled=false"])
    plain = comm.census(cfg)
    assert (len(plain.bn_forward), len(plain.bn_backward)) == (90, 46)
    assert plain.key_gathers == [(1.0, 128, 4)] * 2 and plain.bf_gathers == []
    with_bf = comm.census(
        load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", ["batchformer.gather=true"])
    )
    assert with_bf.key_gathers == [(1.0, 128, 4)] * 4
    assert len(with_bf.bf_gathers) == 1 and with_bf.bf_gathers[0][:2] == (2.0, 128)  # both views' rows, joint scope
    assert with_bf.trainable_params > plain.trainable_params  # the BatchFormer layer's weights are all-reduced too

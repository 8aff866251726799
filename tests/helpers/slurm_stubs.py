"""Stub Slurm commands (srun, scontrol, nvidia-smi, python) for tests that run the sbatch template or a requeue
without Slurm: put `install_stubs(dir)` first on PATH; each stub logs its calls to $STUB_LOG."""

from pathlib import Path

STUBS = {
    # srun: the command once per node of the job, with that node's SLURM_NODEID (its own options are skipped)
    "srun": """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?; done
""",
    # scontrol: `show hostnames` lists the job's two nodes; STUB_SCONTROL_FAIL makes any call fail with that message
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
[ -n "$STUB_SCONTROL_FAIL" ] && { echo "$STUB_SCONTROL_FAIL" >&2; exit 1; }
[ "$1 $2" = "show hostnames" ] && printf 'gpu07\\ngpu08\\n'
exit 0
""",
    "nvidia-smi": """#!/bin/bash
for ((i = 0; i < ${STUB_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
""",
    # python: what it was given, one NUL-terminated argument at a time, in a file per node
    "python": """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_OUT/node$SLURM_NODEID"
""",
}


def install_stubs(bin_dir: Path) -> Path:
    """The stub commands as executables in `bin_dir` (put it first on PATH; they log their calls to $STUB_LOG)."""
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir

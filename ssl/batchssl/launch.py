"""`python -m batchssl.launch` is torchrun (same options, same behaviour) with one change: a node that never joins
ends with one line naming the rendezvous endpoint and the timeout, instead of torchrun's traceback.

    python -m batchssl.launch --nnodes 2 --nproc-per-node 8 --node-rank R --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 --rdzv-conf join_timeout=600 pretrain.py --config RECIPE ...

torchrun's agents meet before any training process starts: with the c10d backend each waits up to
`--rdzv-conf join_timeout` (default 600 s) for `--nnodes` agents, with the static one (`--master-addr`, the
default backend) up to `--rdzv-conf timeout` (default 600 s); then it raises. Those two errors become
`batchssl.launch: error: ...` and exit status 2; anything else is torchrun's own report.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from batchssl.errors import UserError, exit_on_user_error

_DEFAULT_TIMEOUT_S = 600  # torchrun's, for both join_timeout (c10d) and timeout (static)


def rendezvous_summary(args) -> tuple[str, str, str]:
    """(endpoint, the rdzv-conf key of its timeout, the timeout in seconds) of parsed torchrun arguments."""
    conf = dict(item.split("=", 1) for item in (args.rdzv_conf or "").split(",") if "=" in item)
    if args.rdzv_backend == "static":
        endpoint, key = f"{args.master_addr}:{args.master_port}", "timeout"
    else:
        endpoint, key = args.rdzv_endpoint, "join_timeout"
    return endpoint, key, conf.get(key, str(_DEFAULT_TIMEOUT_S))


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    with exit_on_user_error("batchssl.launch"):
        try:
            run(args)
        except (RendezvousTimeoutError, DistStoreError) as err:
            if isinstance(err, DistStoreError) and "waiting for clients" not in str(err):
                raise
            endpoint, key, timeout = rendezvous_summary(args)
            raise UserError(
                f"not every node joined the rendezvous at {endpoint} within {timeout} s "
                f"(--nnodes {args.nnodes}; torchrun --rdzv-conf {key}=SECONDS sets the wait): start the "
                f"same command on every node, and check that {endpoint} is reachable from each"
            ) from None


if __name__ == "__main__":
    main(sys.argv[1:])


# --- The training processes' side: forming the process group (batchssl.distributed.make_accelerator) ----------

TIMEOUT_ENV = "BATCHSSL_DIST_TIMEOUT_S"


def group_timeout():
    """BATCHSSL_DIST_TIMEOUT_S as a timedelta (None: torch's default, 10 min on NCCL, 30 on gloo). It bounds the
    wait for every process to join the group (where no launcher rendezvous came first: processes started by srun
    or mpirun themselves) and every collective after it (a node lost mid-run), so keep it above the longest pause
    one rank can impose on the others (rank 0's kNN monitor, a checkpoint write)."""
    import datetime
    import os

    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw} must be a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


@contextmanager
def explain_join_failure():
    """A process group that does not form in time becomes one line naming MASTER_ADDR:MASTER_PORT and the timeout."""
    import os

    from torch.distributed import DistError

    try:
        yield
    except DistError as err:
        endpoint = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        timeout = group_timeout()
        wait = f"{timeout.total_seconds():g} s ({TIMEOUT_ENV})" if timeout else f"torch's default wait ({TIMEOUT_ENV})"
        raise UserError(
            f"the {os.environ.get('WORLD_SIZE', '?')} processes of this run did not all join the process "
            f"group at {endpoint} within {wait}: start every node, and check that {endpoint} is reachable "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None

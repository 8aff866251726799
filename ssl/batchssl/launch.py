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
            raise UserError(f"not every node joined the rendezvous at {endpoint} within {timeout} s "
                            f"(--nnodes {args.nnodes}; torchrun --rdzv-conf {key}=SECONDS sets the wait): start the "
                            f"same command on every node, and check that {endpoint} is reachable from each") from None


if __name__ == "__main__":
    main(sys.argv[1:])

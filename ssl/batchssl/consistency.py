"""One config and one code version on every process of a run.

Nodes are started by hand or by a scheduler, one command each; a node started with another override (or from
another checkout) would train a different model beside the others without a word, its gradients averaged into
theirs. `check_same_config` is a collective called once at the start: every process all-gathers its resolved config
(flattened to the dotted keys that overrides use) and its code version, and a mismatch stops every process with one
line naming the differing keys and the ranks that hold each value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from batchssl.errors import UserError

# How many differing keys the error line names before it says "and N more".
_SHOWN_KEYS = 4


@functools.cache
def code_version() -> str:
    """The git commit of the checkout this package runs from, else the installed package's version.

    The commit, not a hash of the source files: nodes that share a checkout (the usual cluster set-up) could read a
    file at the moment someone saves it and disagree for no reason; a different commit is what a node started from
    a stale copy shows.
    """
    from batchssl import __version__

    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return f"batchssl {__version__}"
    commit = result.stdout.strip()
    return f"git {commit}" if result.returncode == 0 and commit else f"batchssl {__version__}"


def flat_config(cfg: Any) -> dict[str, Any]:
    """{'section.key': value} of a Config (or of a nested dict), values as JSON would write them."""
    import dataclasses

    from batchssl.config import dotted_items, to_dict

    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return json.loads(json.dumps(dotted_items(tree), default=str))


def config_hash(flat: dict[str, Any], code: str) -> str:
    blob = json.dumps({"config": flat, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_same_config(cfg: Any, code: str | None = None, group=None) -> str:
    """Collective: raise UserError on every process unless all of them run the same config and code version (the
    main process prints it; on the others it is `quiet`).

    `cfg` is the resolved Config (or a nested dict of one); `code` defaults to `code_version()`. Returns the hash of
    config and code (the same on every process), e.g. for the run's records. With no process group it only hashes.
    """
    import torch.distributed as dist

    flat = flat_config(cfg)
    code = code_version() if code is None else code
    mine = {"hash": config_hash(flat, code), "config": flat, "code": code}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return mine["hash"]
    everyone: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine, group=group)
    if len({entry["hash"] for entry in everyone}) > 1:
        import signal

        from batchssl.preemption import ignore_signals

        # Once one process exits, torchrun's agent SIGTERMs the others, which could kill rank 0 before it prints
        # the line: every process ignores SIGTERM first, and the barrier makes that true of all before any leaves.
        ignore_signals([signal.SIGTERM])
        dist.barrier(group=group)
        raise UserError(describe_mismatch(everyone), quiet=dist.get_rank(group) != 0)
    return mine["hash"]


def describe_mismatch(everyone: list[dict]) -> str:
    """One line: the keys (and code version) on which the processes disagree, each value with the ranks holding it.
    `everyone[r]` is rank r's {"config": flat dict, "code": str}."""
    missing = object()
    keys = sorted(set().union(*(entry["config"] for entry in everyone)))
    differing = [(key, [entry["config"].get(key, missing) for entry in everyone]) for key in keys]
    differing = [(key, values) for key, values in differing if any(v != values[0] for v in values)]
    parts = []
    codes = [entry["code"] for entry in everyone]
    if any(c != codes[0] for c in codes):
        parts.append(f"code version ({_by_value(codes, missing)})")
    parts += [f"{key} ({_by_value(values, missing)})" for key, values in differing[:_SHOWN_KEYS]]
    more = len(differing) - _SHOWN_KEYS
    shown = "; ".join(parts) + (f"; and {more} more keys" if more > 0 else "")
    return (
        f"the {len(everyone)} processes of this run were started with different settings: {shown}. "
        "Start every node with the same command, overrides and code"
    )


def _by_value(values: list, missing: object) -> str:
    """'1 on ranks 0-7, 2 on rank 8': each distinct value (in order of first rank) with the ranks that hold it."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        text = "unset" if value is missing else json.dumps(value) if not isinstance(value, str) else value
        groups.setdefault(text, []).append(rank)
    return ", ".join(f"{text} on {_ranks(ranks)}" for text, ranks in groups.items())


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2,5'; [3] -> 'rank 3'."""
    spans, start, prev = [], ranks[0], ranks[0]
    for rank in ranks[1:]:
        if rank != prev + 1:
            spans.append((start, prev))
            start = rank
        prev = rank
    spans.append((start, prev))
    text = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return ("rank " if len(ranks) == 1 else "ranks ") + text

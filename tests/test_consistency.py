"""One config everywhere: batchssl.consistency's message in process, and the collective under torchrun (2 processes,
gloo), each rank with its own overrides.

Run as a script (`torchrun ... tests/test_consistency.py OVERRIDES_JSON`), this file is the 2-process side: rank r
loads the default recipe with OVERRIDES_JSON[r] and calls check_same_config twice, first with no override (every
rank agrees: it prints the hash) and then with its own.
"""

import json
import sys

import pytest

from batchssl.config import DEFAULT_RECIPE, load_config
from batchssl.consistency import check_same_config, code_version, config_hash, describe_mismatch, flat_config
from helpers import REPO, run_entry


def entry(code="git abc", **config):
    return {"config": {"seed": 0, "train.epochs": 1, **config}, "code": code}


def test_mismatch_names_each_differing_key_with_the_ranks_holding_each_value():
    everyone = [entry(), entry(), entry(**{"train.epochs": 2}), entry(), entry(**{"train.epochs": 2})]
    message = describe_mismatch(everyone)
    assert "the 5 processes of this run were started with different settings: " in message
    assert "train.epochs (1 on ranks 0-1,3, 2 on ranks 2,4)" in message
    assert "seed" not in message and "code version" not in message
    assert "\n" not in message


def test_mismatch_names_the_code_version_and_keys_only_one_rank_has():
    everyone = [entry(), entry(code="git def", **{"data.extra": "x"})]
    message = describe_mismatch(everyone)
    assert "code version (git abc on rank 0, git def on rank 1)" in message
    assert "data.extra (unset on rank 0, x on rank 1)" in message


def test_mismatch_lists_four_keys_then_counts_the_rest():
    other = entry(**{f"k{i}": i for i in range(6)})
    message = describe_mismatch([entry(), other])
    assert message.count(" on rank 1)") == 4 and "; and 2 more keys" in message


def test_hash_depends_on_values_and_code_not_on_key_order():
    cfg = load_config(REPO / DEFAULT_RECIPE)
    flat = flat_config(cfg)
    assert config_hash(flat, "v") == config_hash(dict(reversed(list(flat.items()))), "v")
    assert config_hash(flat, "v") != config_hash(flat, "w")
    other = flat_config(load_config(REPO / DEFAULT_RECIPE, ["train.epochs=2"]))
    assert config_hash(flat, "v") != config_hash(other, "v")
    # a tuple (optim.betas) and the list YAML reads back are the same setting
    assert flat["optim.betas"] == list(cfg.optim.betas)


def test_code_version_is_the_checkout_commit_or_the_package_version():
    assert code_version().startswith(("git ", "batchssl "))


def test_one_process_only_hashes():
    cfg = load_config(REPO / DEFAULT_RECIPE)
    assert check_same_config(cfg, code="v") == config_hash(flat_config(cfg), "v")


@pytest.mark.slow
def test_two_processes_with_different_overrides_stop_with_one_line_naming_the_keys(tmp_path):
    per_rank = [["train.epochs=1"], ["train.epochs=2", "seed=3"]]
    # Each rank's stdout and stderr in files of their own (torchrun --redirects): on one shared pipe their lines
    # can interleave.
    script = REPO / "tests" / "test_consistency.py"
    redirects = ["--log-dir", tmp_path, "--redirects", "3"]
    result = run_entry(*redirects, script, json.dumps(per_rank), launcher="torchrun", timeout=120, check=False)
    assert result.returncode != 0
    logs = {name: sorted(tmp_path.glob(f"**/{name}.log")) for name in ("stdout", "stderr")}
    assert len(logs["stdout"]) == len(logs["stderr"]) == 2, logs
    lines = {name: [line for log in files for line in log.read_text().splitlines()] for name, files in logs.items()}
    # The same config on both: both ranks print the same hash before the second, differing check.
    hashes = [line.split()[1] for line in lines["stdout"] if line.startswith("same ")]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    errors = [line for line in lines["stderr"] if line.startswith("same_config: error:")]
    assert len(errors) == 1  # every rank stops; the run says why once
    assert "Traceback" not in "".join(lines["stderr"])
    assert "seed (0 on rank 0, 3 on rank 1); train.epochs (1 on rank 0, 2 on rank 1)." in errors[0]


def _main(per_rank: list[list[str]]) -> None:
    import torch.distributed as dist

    from batchssl.errors import exit_on_user_error

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with exit_on_user_error("same_config"):
        print("same", check_same_config(load_config(REPO / DEFAULT_RECIPE)), flush=True)
        check_same_config(load_config(REPO / DEFAULT_RECIPE, per_rank[rank]))
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))

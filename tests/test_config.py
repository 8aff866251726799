import pytest

from batchssl.config import DEFAULT_RECIPE, load_config, load_run_config, save_config
from batchssl.errors import UserError
from helpers import REPO, load_script, main_in_process, run_entry


def test_default_recipe_is_fashion_mnist_with_batchformer():
    cfg = load_config()
    assert (cfg.data.name, cfg.method.name, cfg.batchformer.enabled) == ("fashion_mnist", "mocov3", True)
    assert DEFAULT_RECIPE.name == "mocov3_bf.yaml"


def test_quick_run_keys_and_override_types():
    cfg = load_config(
        None,
        [
            "output_dir=runs/x",
            "seed=3",
            "train.epochs=2",
            "data.limit=100",
            "data.val_limit=50",
            "checkpoint.every_n_epochs=1",
            "monitor.every_n_epochs=5",
            "optim.base_lr=1",
            "optim.weight_decay=1e-5",
            "optim.betas=[0.8, 0.9]",
            "train.log_with=null",
            "train.mixed_precision=no",
        ],
    )
    assert cfg.output_dir == "runs/x" and cfg.seed == 3 and cfg.train.epochs == 2
    assert cfg.data.limit == 100 and cfg.data.val_limit == 50
    assert cfg.checkpoint.every_n_epochs == 1 and cfg.monitor.every_n_epochs == 5
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.weight_decay == 1e-5
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.log_with is None
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 reads `no` as False


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.epoch=3"], ["unknown config key 'train.epoch'", "train.epochs"]),
        (["trian.epochs=3"], ["unknown config key 'trian'"]),
        (["train.epochs=three"], ["'train.epochs' expects int", "'three'"]),
        (["train.epochs=2.5"], ["'train.epochs' expects int"]),
        (["batchformer.scope=global"], ["'batchformer.scope'", "'joint'", "'per_view'"]),
        (["batchformer.enabled=maybe"], ["'batchformer.enabled' expects bool"]),
        (["train=3"], ["'train' expects a mapping"]),
        (["train.epochs"], ["dotted.key=value"]),
        (["train.epochs=0"], ["train.epochs must be >= 1"]),
        (["optim.base_lr=.nan"], ["optim.base_lr must be a positive number"]),
        (["optim.base_lr=.inf"], ["optim.base_lr must be a positive number"]),
        (["optim.base_lr=-0.1"], ["optim.base_lr must be a positive number"]),
        (["monitor.k=0"], ["monitor.k must be >= 1"]),
        (["monitor.temperature=0"], ["monitor.temperature must be > 0"]),
        (["data.num_workers=-3"], ["data.num_workers must be >= 0"]),
        (["augment.min_scale=2"], ["augment.min_scale must be in (0, 1]"]),
        (["data.image_size=0"], ["data.image_size must be >= 8"]),
        (["data.imbalance_ratio=0.5"], ["data.imbalance_ratio must be >= 1"]),
        (["data.pretrain_limit=0"], ["data.pretrain_limit must be >= 1"]),
        (["optim.final_lr_ratio=1.5"], ["optim.final_lr_ratio must be in [0, 1]"]),
        (["method.momentum_final=0.9"], ["method.momentum_final must be in [method.momentum, 1]"]),
        (["output_dir="], ["'output_dir' expects str, got None"]),
        (["output_dir=''"], ["output_dir must name a directory"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as err:
        load_config(None, override)
    for word in words:
        assert word in str(err.value)


def test_bad_recipe_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: resnet18\n  depth: 3\n")
    with pytest.raises(UserError, match="unknown config key 'model.depth'"):
        load_config(bad)


def test_empty_recipe_and_yaml_errors_say_where(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(UserError, match="is empty"):
        load_config(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 3\n batch_size: 4\n")
    with pytest.raises(UserError, match=r"not valid YAML \(line 3, column 2\)"):
        load_config(broken)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "optim.betas=[0.5, 0.6]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == cfg


def test_cli_bad_key_is_one_line_and_nonzero(tmp_path):
    # In this process (the process boundary: test_bad_input.test_config_errors_come_before_torch_is_imported).
    out = tmp_path / "run"
    err = main_in_process(load_script("pretrain.py").main, ["train.epoch=1", f"output_dir={out}"], expect=2)
    assert err.strip().splitlines() == [
        "pretrain.py: error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"
    ]
    assert not out.exists()  # nothing was started


def test_repo_root_does_not_shadow_the_tls_module():
    # A fresh interpreter started in the repository root, as a user's `python pretrain.py` is.
    result = run_entry("-c", "import ssl; ssl.create_default_context(); print(ssl.__file__)", timeout=60)
    assert str(REPO) not in result.stdout


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default():
    """A config.yaml written by an earlier version lacks the keys added since: they compare as their defaults (the
    behaviour the run had), and a key that no longer exists is no change; a real change is still reported."""
    from batchssl.checkpoint import config_changes
    from batchssl.config import to_dict

    cfg = load_config(REPO / DEFAULT_RECIPE)
    older = to_dict(cfg)
    del older["augment"]["local_crops"]  # added in a later version; the recipe leaves it at its default
    older["train"]["a_removed_setting"] = 3
    assert config_changes(cfg, older) == []
    changed = load_config(REPO / DEFAULT_RECIPE, ["augment.local_crops=2"])
    assert config_changes(changed, older) == ["augment.local_crops: 0 -> 2"]

"""Every recipe loads, each BatchFormer recipe differs from its twin only in BatchFormer, the GPU recipes carry
their papers' numbers, every CIFAR/STL/ImageNet model builds and runs one training-mode forward on the CPU (the
widest heads narrowed for the forward), and accelerate_config.yaml is a config `accelerate launch --config_file`
accepts."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from batchssl.backbones import build_backbone
from batchssl.config import dotted_items, load_config, to_dict
from batchssl.data import INFO
from batchssl.methods import build_method
from batchssl.optim import build_optimizer, peak_lr
from helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
GPU_RECIPES = [p for p in RECIPES if p.parent.name != "fashion_mnist"]
BF_RECIPES = [p for p in RECIPES if p.stem.endswith("_bf")]
ACCELERATE_CONFIG = REPO / "accelerate_config.yaml"
GPUS = 8  # accelerate_config.yaml's num_processes


def rid(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def twin(path: Path) -> Path:
    return path.with_name(path.stem[: -len("_bf")] + ".yaml")


def test_the_recipe_set_is_complete():
    names = {rid(p) for p in RECIPES}
    expected = set()
    for ds, methods in {
        "cifar10": ["simsiam", "mocov3", "mocov3_vit"],
        "cifar100": ["simsiam", "mocov3", "mocov3_vit"],
        "stl10": ["simsiam", "mocov3"],
        "imagenet100": ["simsiam", "mocov3_r50", "mocov3_vit_small"],
        "imagenet": ["simsiam", "mocov3_r50", "mocov3_vit_small"],
    }.items():
        expected |= {f"{ds}/{m}{bf}" for m in methods for bf in ("", "_bf")}
    # long-tailed (imbalance ratio 100), with and without BatchFormer; Fashion-MNIST also balanced at the LT size
    expected |= {f"{ds}/mocov3{bf}_lt" for ds in ("cifar10", "cifar100") for bf in ("", "_bf")}
    expected |= {
        f"fashion_mnist/{m}{bf}_lt{tail}"
        for m in ("simsiam", "mocov3")
        for bf in ("", "_bf")
        for tail in ("", "_balanced")
    }
    expected |= {
        f"{ds}/{m}{bf}"
        for ds in ("fashion_mnist", "cifar10", "cifar100", "imagenet")
        for m in ("byol", "simclr", "barlowtwins", "vicreg", "dino")
        for bf in ("", "_bf")
    }
    assert expected <= names, f"missing recipes: {sorted(expected - names)}"


@pytest.mark.parametrize("path", RECIPES, ids=rid)
def test_recipe_loads_and_writes_to_its_own_run_directory(path):
    cfg = load_config(path)
    assert cfg.output_dir == f"runs/{path.parent.name}/{path.stem}"
    assert path.read_text().startswith("#"), "every recipe opens with a comment saying what it is"


@pytest.mark.parametrize("path", BF_RECIPES, ids=rid)
def test_batchformer_recipe_equals_its_twin_but_for_batchformer(path):
    assert twin(path).is_file(), f"{rid(path)} has no twin {twin(path).name}"
    bf, base = to_dict(load_config(path)), to_dict(load_config(twin(path)))
    assert bf["batchformer"]["enabled"] and not base["batchformer"]["enabled"]
    # Methods with no head after the projector (SimCLR, Barlow Twins, VICReg) take BatchFormer on the backbone, so
    # that the projector is the head both streams share (docs/methods.md).
    position = "backbone" if bf["method"]["name"] in ("simclr", "barlowtwins", "vicreg") else "projector"
    assert (bf["batchformer"]["scope"], bf["batchformer"]["position"], bf["batchformer"]["weight"]) == (
        "joint",
        position,
        1.0,
    )
    for d in (bf, base):
        d.pop("batchformer"), d.pop("output_dir")
    diff = {k: (v, dotted_items(base).get(k)) for k, v in dotted_items(bf).items() if dotted_items(base).get(k) != v}
    assert bf == base, f"{rid(path)} differs from its twin outside batchformer: {diff}"


# ---------------------------------------------------------------------------------------------- GPU recipes


@pytest.mark.parametrize("path", GPU_RECIPES, ids=rid)
def test_gpu_recipe_conventions(path):
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.data.num_workers >= 8
    assert cfg.train.batch_size % GPUS == 0 and cfg.train.batch_size // GPUS >= 32
    assert 1 <= cfg.checkpoint.every_n_epochs <= cfg.train.epochs
    assert 1 <= cfg.monitor.every_n_epochs <= cfg.train.epochs
    assert cfg.method.proj_dim % cfg.batchformer.nhead == 0, "BatchFormer's attention needs dim % nhead == 0"
    command = f"accelerate launch --config_file accelerate_config.yaml pretrain.py --config recipes/{rid(path)}.yaml"
    assert command in path.read_text()


# recipe -> (optimizer, base lr, global batch, lr = base * batch / 256, epochs, warmup epochs)
SCHEDULES = {
    "cifar10/simsiam": ("sgd", 0.03, 512, 0.06, 800, 0),
    "cifar10/mocov3": ("sgd", 0.12, 512, 0.24, 800, 10),
    "cifar10/mocov3_vit": ("adamw", 1.5e-4, 1024, 6e-4, 800, 40),
    "cifar10/mocov3_lt": ("sgd", 0.12, 512, 0.24, 3200, 40),  # the balanced twin's steps on 12406 images
    "cifar10/mocov3_bf_lt": ("sgd", 0.12, 512, 0.24, 3200, 40),
    "stl10/simsiam": ("sgd", 0.03, 512, 0.06, 400, 0),
    "stl10/mocov3": ("sgd", 0.12, 512, 0.24, 400, 10),
    "imagenet100/simsiam": ("sgd", 0.05, 512, 0.1, 200, 0),
    "imagenet100/mocov3_r50": ("lars", 0.6, 1024, 2.4, 200, 10),
    "imagenet100/mocov3_vit_small": ("adamw", 1.5e-4, 1024, 6e-4, 300, 40),
    "imagenet/simsiam": ("sgd", 0.05, 512, 0.1, 100, 0),
    "imagenet/mocov3_r50": ("lars", 0.6, 4096, 9.6, 100, 10),
    "imagenet/mocov3_vit_small": ("adamw", 1.5e-4, 4096, 2.4e-3, 300, 40),
}
SCHEDULES.update(
    {  # the five methods of issue 25: CIFAR as cifar10/mocov3 (lightly's SGD), ImageNet the papers'
        **{
            f"cifar10/{m}": ("sgd", 0.12, 512, 0.24, 800, 10)
            for m in ("byol", "simclr", "barlowtwins", "vicreg", "dino")
        },
        "imagenet/byol": ("lars", 0.2, 4096, 3.2, 1000, 10),
        "imagenet/simclr": ("lars", 0.3, 4096, 4.8, 1000, 10),
        "imagenet/barlowtwins": ("lars", 0.2, 2048, 1.6, 1000, 10),
        "imagenet/vicreg": ("lars", 0.2, 2048, 1.6, 1000, 10),
        "imagenet/dino": ("sgd", 0.03, 512, 0.06, 100, 10),
    }
)
SCHEDULES.update({k.replace("cifar10/", "cifar100/"): v for k, v in SCHEDULES.items() if k.startswith("cifar10/")})


@pytest.mark.parametrize("path", GPU_RECIPES, ids=rid)
def test_effective_learning_rate_and_schedule(path):
    name = rid(path).removesuffix("_bf")
    assert name in SCHEDULES, f"{name}: add its schedule to SCHEDULES"
    optimizer, base_lr, batch, lr, epochs, warmup = SCHEDULES[name]
    cfg = load_config(path)
    assert (cfg.optim.name, cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs) == (
        optimizer,
        batch,
        epochs,
        warmup,
    )
    assert cfg.optim.base_lr == pytest.approx(base_lr)
    assert cfg.optim.base_lr * cfg.train.batch_size / 256 == pytest.approx(lr)
    assert peak_lr(cfg) == pytest.approx(lr)  # what the trainer uses


# The papers' numbers, key by key (dotted config keys), for the recipes that reproduce an official setting.
SIMSIAM_IMAGENET = {  # facebookresearch/simsiam main_simsiam.py defaults + --fix-pred-lr
    "model.arch": "resnet50",
    "method.name": "simsiam",
    "method.proj_hidden_dim": 2048,
    "method.proj_dim": 2048,
    "method.proj_layers": 3,
    "method.pred_hidden_dim": 512,
    "optim.name": "sgd",
    "optim.weight_decay": 1e-4,
    "optim.momentum": 0.9,
    "optim.fixed_predictor_lr": True,
    "augment.min_scale": 0.2,
    "data.name": "imagefolder",
}
MOCOV3_R50 = {  # facebookresearch/moco-v3 main_moco.py defaults + CONFIG.md's 100-epoch ResNet-50 command
    "model.arch": "resnet50",
    "method.name": "mocov3",
    "method.temperature": 1.0,
    "method.momentum": 0.99,
    "method.proj_hidden_dim": 4096,
    "method.proj_dim": 256,
    "method.proj_layers": 2,
    "optim.name": "lars",
    "optim.base_lr": 0.6,
    "optim.weight_decay": 1e-6,
    "optim.momentum": 0.9,
    "optim.warmup_epochs": 10,
    "augment.min_scale": 0.2,
    "augment.preset": "byol",
    "data.name": "imagefolder",
}
MOCOV3_VIT_S = {  # CONFIG.md's ViT-Small command
    "model.arch": "vit_small",
    "model.patch_size": 16,
    "model.freeze_patch_embed": True,
    "method.name": "mocov3",
    "method.temperature": 0.2,
    "method.momentum": 0.99,
    "method.proj_hidden_dim": 4096,
    "method.proj_dim": 256,
    "method.proj_layers": 3,
    "optim.name": "adamw",
    "optim.base_lr": 1.5e-4,
    "optim.weight_decay": 0.1,
    "optim.betas": [0.9, 0.999],
    "optim.warmup_epochs": 40,
    "augment.min_scale": 0.08,
    "augment.preset": "byol",
    "data.name": "imagefolder",
}
SIMSIAM_CIFAR = {  # SimSiam paper, appendix D
    "model.arch": "resnet18",
    "model.stem": "cifar",
    "method.name": "simsiam",
    "method.proj_hidden_dim": 2048,
    "method.proj_dim": 2048,
    "method.proj_layers": 2,
    "method.pred_hidden_dim": 512,
    "optim.name": "sgd",
    "optim.base_lr": 0.03,
    "optim.weight_decay": 5e-4,
    "optim.momentum": 0.9,
    "optim.fixed_predictor_lr": True,
    "train.batch_size": 512,
    "train.epochs": 800,
}
KEY_NUMBERS = {
    "imagenet/simsiam": {**SIMSIAM_IMAGENET, "train.epochs": 100, "train.batch_size": 512, "optim.base_lr": 0.05},
    "imagenet/mocov3_r50": {**MOCOV3_R50, "train.epochs": 100, "train.batch_size": 4096},
    "imagenet/mocov3_vit_small": {**MOCOV3_VIT_S, "train.epochs": 300, "train.batch_size": 4096},
    "imagenet100/simsiam": {**SIMSIAM_IMAGENET, "optim.base_lr": 0.05},
    "imagenet100/mocov3_r50": MOCOV3_R50,
    "imagenet100/mocov3_vit_small": MOCOV3_VIT_S,
    "cifar10/simsiam": SIMSIAM_CIFAR,
    "cifar100/simsiam": SIMSIAM_CIFAR,
    "stl10/simsiam": {**SIMSIAM_CIFAR, "model.stem": "imagenet", "train.epochs": 400, "data.name": "stl10"},
}


@pytest.mark.parametrize("name", sorted(KEY_NUMBERS))
@pytest.mark.parametrize("bf", ["", "_bf"])
def test_paper_numbers(name, bf):
    got = dotted_items(to_dict(load_config(REPO / "recipes" / f"{name}{bf}.yaml")))
    wrong = {
        k: (got[k], v)
        for k, v in KEY_NUMBERS[name].items()
        if (got[k] != pytest.approx(v) if isinstance(v, float) else got[k] != v)
    }
    assert not wrong, f"{name}{bf}: (recipe, paper) = {wrong}"


# ---------------------------------------------------------------------------------------------- models


def image_size(cfg) -> int:
    """The recipe's natural size, except that 224-px ImageNet models run at 64 px here: the same layers, heads and
    feature dims (the ViT is built for the size it is given), at 12x less compute on a 2-core CPU."""
    size = cfg.data.image_size or INFO[cfg.data.name].image_size
    return 64 if size >= 224 else size


# CIFAR-100 and ImageNet-100 build exactly the models of CIFAR-10 and ImageNet (checked below): built once.
SAME_MODEL_AS = {"cifar100": "cifar10", "imagenet100": "imagenet"}
MODEL_RECIPES = [p for p in GPU_RECIPES if p.parent.name not in SAME_MODEL_AS]
MODEL_KEYS = ("model", "method", "batchformer")


@pytest.mark.parametrize("path", [p for p in GPU_RECIPES if p.parent.name in SAME_MODEL_AS], ids=rid)
def test_subset_recipes_build_the_same_model_as_their_full_dataset_twin(path):
    other = REPO / "recipes" / SAME_MODEL_AS[path.parent.name] / path.name
    a, b = load_config(path), load_config(other)
    assert {k: to_dict(a)[k] for k in MODEL_KEYS} == {k: to_dict(b)[k] for k in MODEL_KEYS}
    assert image_size(a) == image_size(b)


@pytest.fixture
def one_thread():
    """Small CPU forwards run faster on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Heads with an output wider than this (Barlow Twins' and VICReg's 8192, DINO's 65536 prototypes) are built at full
# size on the meta device (shapes only: no memory, no initialisation), and their training forward runs with the
# projector capped at NARROW_HEAD: the full-size forward took 10-20 s each on a 2-core CPU (151 M parameters to
# initialise, an 8192 x 8192 cross-correlation or covariance), and its code is the same at any width.
WIDE_HEAD, NARROW_HEAD = 4096, 2048


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=rid)
def test_model_builds_and_runs_one_training_forward(path, one_thread):
    torch.manual_seed(0)
    cfg = load_config(path)
    size = image_size(cfg)
    wide = cfg.method.proj_dim > WIDE_HEAD
    with torch.device("meta") if wide else nullcontext():
        backbone, feature_dim = build_backbone(cfg.model, 3, size)
        method = build_method(cfg, backbone, feature_dim).train()
    expected_dim = {"resnet18": 512, "resnet50": 2048, "vit_small": 384}[cfg.model.arch]
    assert feature_dim == expected_dim
    assert (method.batchformer is not None) == cfg.batchformer.enabled

    optimizer = build_optimizer(method.parameter_groups(cfg.optim), cfg.optim)
    kind = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}.get(cfg.optim.name)
    assert kind is None or isinstance(optimizer, kind)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if cfg.model.freeze_patch_embed:  # the random patch projection stays fixed: not optimised at all
        assert all(id(p) not in grouped for p in backbone.vit.conv_proj.parameters())
    if cfg.optim.fixed_predictor_lr:
        assert any(g["fixed_lr"] for g in optimizer.param_groups)

    if wide:  # the same recipe with a narrower projector, built for real
        narrow = [f"method.{k}={min(getattr(cfg.method, k), NARROW_HEAD)}" for k in ("proj_hidden_dim", "proj_dim")]
        cfg = load_config(path, narrow)
        backbone, feature_dim = build_backbone(cfg.model, 3, size)
        method = build_method(cfg, backbone, feature_dim).train()
    views = [torch.randn(4, 3, size, size) for _ in range(2)]
    with torch.no_grad():  # train mode (batch-norm statistics, dropout, momentum update); gradients not needed
        out = method(views, step=0, total_steps=100)
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert ("loss_bf" in out) == cfg.batchformer.enabled
    assert "z_std" in out


# ---------------------------------------------------------------------------------------------- Accelerate


def test_accelerate_config_parses_as_a_multi_gpu_cluster_config():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    cfg = ClusterConfig.from_yaml_file(str(ACCELERATE_CONFIG))
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (GPUS, 1, 0)
    assert (cfg.mixed_precision, cfg.use_cpu, cfg.gpu_ids, cfg.rdzv_backend) == ("bf16", False, "all", "static")
    assert cfg.same_network is True and cfg.main_training_function == "main"
    for path in GPU_RECIPES:  # every GPU recipe runs under it as it stands
        recipe = load_config(path)
        assert recipe.train.batch_size % cfg.num_processes == 0
        assert recipe.train.mixed_precision == cfg.mixed_precision


def test_accelerate_launch_accepts_the_config_file():
    """What `accelerate launch --config_file accelerate_config.yaml pretrain.py ...` does before it starts the
    processes: read the file and fill in its arguments."""
    import accelerate.commands.launch as launch  # accelerate is pinned: its launcher has these internals

    parser = launch.launch_command_parser()
    args = parser.parse_args(
        ["--config_file", str(ACCELERATE_CONFIG), "pretrain.py", "--config", "recipes/cifar10/simsiam_bf.yaml"]
    )
    args, defaults, _ = launch._validate_launch_command(args)
    assert args.multi_gpu and not args.cpu
    assert (args.num_processes, args.num_machines, args.machine_rank) == (GPUS, 1, 0)
    assert (args.mixed_precision, args.gpu_ids, args.rdzv_backend) == ("bf16", "all", "static")
    assert args.training_script == "pretrain.py"
    assert args.training_script_args == ["--config", "recipes/cifar10/simsiam_bf.yaml"]

"""Typed configuration: dataclass sections, a YAML recipe, `dotted.key=value` overrides, strict validation.

An unknown key or a value of the wrong type raises UserError naming the key and what was expected, before
anything is built, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from batchssl.errors import UserError

# The README's default run, relative to the working directory (pretrain.py passes it relative to itself).
DEFAULT_RECIPE = Path("recipes") / "fashion_mnist" / "mocov3_bf.yaml"


@dataclass
class DataConfig:
    # imagefolder: data.root holds train/<class>/* and val/<class>/*; shards: data.root holds the tar shards that
    # `python -m batchssl.shards IMAGEFOLDER OUT` wrote (WebDataset format, streamed per process).
    name: Literal["fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "shards"] = "fashion_mnist"
    root: str = "data"  # Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist (Debian's package)
    download: bool = False  # let torchvision download a missing dataset (needs internet)
    limit: int | None = None  # use only the first N training images
    val_limit: int | None = None  # use only the first N validation images
    # Hold out the last N training images as the validation split (for tuning without touching the test split).
    holdout: int = 0
    num_workers: int = 2  # loader workers (data.pipeline workers, and feature extraction for the monitor)
    # Where the two views are made: device = batched on the training device from a uint8 copy of the split
    # (in-memory datasets); split = loader workers decode (at reduced scale) and crop image files, the device does
    # the rest (batchssl.filepipeline); workers = lightly's per-sample transforms in loader workers;
    # auto = device for in-memory datasets, split for image files.
    pipeline: Literal["auto", "device", "split", "workers"] = "auto"
    # Where data.pipeline=split decodes JPEGs: cpu = loader workers (at reduced DCT scale); gpu = the training
    # process, batched with nvJPEG on the CUDA device (workers only read files and draw crop boxes; for when the
    # workers cannot keep up); auto = cpu until benchmarks/gpu_check.sh has measured where gpu pays (untested on a GPU).
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    shuffle_buffer: int = 1000  # data.name shards: images in each process's shuffle buffer
    image_size: int | None = None  # None: the dataset's natural size (28, 32, 96, 224)
    # Long-tailed pretraining split: class c of C keeps its first int(n_max * ratio^(-c / (C - 1))) images
    # (the CIFAR-10-LT convention). 1: balanced. Evaluation splits stay balanced.
    imbalance_ratio: float = 1.0
    # Pretraining only: its first N images (after holdout and limit, before the long-tailed cut); the kNN bank and
    # the probes keep theirs. The balanced twin of a long-tailed run: the same number of images, the same bank.
    pretrain_limit: int | None = None

    def __post_init__(self):
        if self.shuffle_buffer < 1:
            raise UserError("data.shuffle_buffer must be >= 1")


@dataclass
class AugmentConfig:
    # auto: the method's paper augmentation (BYOL's asymmetric pair for MoCo v3, BYOL, Barlow Twins, VICReg, DINO;
    # MoCo v2's for SimSiam and SimCLR).
    preset: Literal["auto", "simsiam", "byol"] = "auto"
    min_scale: float | None = None  # RandomResizedCrop lower bound; None: the preset's (0.2 SimSiam, 0.08 BYOL)
    color_jitter: float = 1.0  # colour-jitter strength multiplier (0 disables)
    blur: bool | None = None  # None: on for images >= 64 px (blur at 32 px destroys them)
    solarize: bool = True  # BYOL preset only
    hflip: float = 0.5
    # Multi-crop (SwAV, DINO): this many local crops per image after the two global views (batchssl.views).
    local_crops: int = 0
    local_size: int | None = None  # None: 96/224 of the image size, a multiple of 4 (96 at 224 px, 12 at 28)
    local_scale: tuple[float, float] = (0.05, 0.4)  # RandomResizedCrop area range of the local crops

    def __post_init__(self):
        lo, hi = self.local_scale
        if self.local_crops < 0:
            raise UserError("augment.local_crops must be >= 0")
        if self.local_size is not None and self.local_size < 8:
            raise UserError("augment.local_size must be >= 8 pixels or null")
        if not 0 < lo <= hi <= 1:
            raise UserError(f"augment.local_scale must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")


BUILTIN_ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


@dataclass
class ModelConfig:
    # One of BUILTIN_ARCHS, or `timm:<model name>` (any timm model, built with pretrained=False, num_classes=0;
    # needs the optional extra: pip install 'batchssl[timm]').
    arch: str = "resnet18"
    width: float = 1.0  # channel multiplier for ResNets (0.25 -> 16 stem channels)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar for images < 64 px
    patch_size: int | None = None  # ViT: None -> 4 for small images, 16 otherwise
    freeze_patch_embed: bool = False  # MoCo v3's random-patch-projection trick for ViT stability

    def __post_init__(self):
        if self.arch.startswith("timm:"):
            _check_timm_model(self.arch.removeprefix("timm:"))
        elif self.arch not in BUILTIN_ARCHS:
            raise UserError(
                f"config key 'model.arch' expects {' | '.join(map(repr, BUILTIN_ARCHS))} or "
                f"'timm:<model name>', got {self.arch!r}"
            )


def _check_timm_model(name: str) -> None:
    """Refuse an uninstalled timm or an unknown model name while the config is read, before anything runs."""
    try:
        import timm
    except ImportError:
        raise UserError(f"model.arch=timm:{name} needs timm: pip install 'batchssl[timm]'") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else ""
        raise UserError(f"model.arch=timm:{name}: timm has no model of that name{hint}")


@dataclass
class MethodConfig:
    name: Literal["simsiam", "mocov3", "byol", "simclr", "barlowtwins", "vicreg", "dino"] = "simsiam"
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048  # the projector's output (DINO: the head's K output dimensions, the prototypes)
    proj_layers: int = 3
    pred_hidden_dim: int = 512
    pred_last_bn: bool = False  # MoCo v3: BN (no affine) on the predictor output for ViT, none for ResNet
    temperature: float = 1.0  # MoCo v3 tau; SimCLR's NT-Xent tau; DINO's student temperature
    # The momentum encoder's (MoCo v3, BYOL) or teacher's (DINO) EMA factor at the first step ...
    momentum: float = 0.99
    # ... rising by a half cosine to this at the last step (1: MoCo v3's, BYOL's and DINO's schedule; equal to
    # method.momentum: a constant momentum, as MoCo v1/v2)
    momentum_final: float = 1.0
    # Barlow Twins: weight of the off-diagonal (redundancy) term of the cross-correlation loss (the paper's lambda)
    barlow_lambda: float = 0.0051
    # VICReg: weights of the invariance, variance and covariance terms (the paper's lambda, mu, nu)
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)
    # DINO: the head is MLP (proj_layers, proj_hidden_dim) -> bottleneck -> l2-norm -> weight-normed K = proj_dim
    dino_bottleneck_dim: int = 256
    dino_norm_last_layer: bool = True  # the last layer's weight-norm gain fixed at 1 (the paper's default)
    dino_head_bn: bool = False  # batch norm in the head's MLP (DINO's use_bn_in_head; off in the paper)
    dino_freeze_last_layer_epochs: int = 0  # the last layer gets no updates for this many epochs (DINO: 1)
    teacher_temp: float = 0.04  # DINO's teacher temperature after the warmup ...
    teacher_temp_start: float = 0.04  # ... rising linearly from this ...
    teacher_temp_warmup_epochs: float = 0.0  # ... over this many epochs (per step, not per epoch as DINO)
    center_momentum: float = 0.9  # DINO: EMA of the teacher's centre (the global batch mean of its outputs)

    def __post_init__(self):
        temps = (self.teacher_temp, self.teacher_temp_start)
        checks = [
            (self.barlow_lambda >= 0, "method.barlow_lambda must be >= 0"),
            (all(w >= 0 for w in self.vicreg_weights), "method.vicreg_weights must each be >= 0"),
            (self.dino_bottleneck_dim >= 1, "method.dino_bottleneck_dim must be >= 1"),
            (self.dino_freeze_last_layer_epochs >= 0, "method.dino_freeze_last_layer_epochs must be >= 0"),
            (all(t > 0 for t in temps), "method.teacher_temp and teacher_temp_start must be > 0"),
            (self.teacher_temp_warmup_epochs >= 0, "method.teacher_temp_warmup_epochs must be >= 0"),
            (0 <= self.center_momentum < 1, "method.center_momentum must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class BatchFormerConfig:
    enabled: bool = False
    scope: Literal["joint", "per_view"] = "joint"
    position: Literal["projector", "backbone"] = "projector"
    gather: bool = False  # attend over the global batch (all processes), with gradients
    weight: float = 1.0  # weight of the BatchFormer stream's loss
    lr_scale: float = 1.0
    nhead: int = 4
    dropout: float = 0.5


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    base_lr: float = 0.05  # lr = base_lr * global_batch / 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 0.0
    # The cosine ends at peak lr x this (0: the papers' decay to zero; timm's and solo-learn's min_lr as a ratio)
    final_lr_ratio: float = 0.0
    fixed_predictor_lr: bool = False  # SimSiam: predictor keeps the initial lr (no cosine decay)
    # The lr of biases and norm parameters (the groups without weight decay) as a ratio of the weights' lr
    # (Barlow Twins' official code: 0.0048 / 0.2 = 0.024); 1: the same lr
    bias_lr_ratio: float = 1.0
    # Weight decay on a cosine from weight_decay (step 0) to this (the last step), as DINO's 0.04 -> 0.4 for
    # ViTs; null: constant
    weight_decay_end: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512  # global batch, split evenly across processes
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every_n_steps: int = 10
    log_with: Literal["tensorboard", "wandb"] | None = None
    max_grad_norm: float | None = None
    # global: torch's clip of the norm over all gradients; per_tensor: each parameter's gradient clipped to its
    # own norm max_grad_norm (DINO's official clip_gradients)
    max_grad_norm_mode: Literal["global", "per_tensor"] = "global"
    channels_last: bool = True  # ResNets and their inputs in channels_last memory format
    # torch.compile: none, the backbone (Module.compile, parameter names unchanged), or the whole method's forward
    compile: Literal["none", "backbone", "model"] = "none"


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 10
    every_n_steps: int = 0  # also a checkpoint after every N-th global step (0: off); keep_last counts both kinds
    keep_last: int = 2
    # Signals that make the trainer finish the current step, checkpoint and exit with 128 + the signal's number
    # (on every process, even when only one got it); SIGINT (Ctrl-C) always does, and a second one stops at once.
    signals: str = "SIGTERM,SIGUSR1"  # comma-separated names; "" for none
    # After such a checkpoint under Slurm, rank 0 runs `scontrol requeue $SLURM_JOB_ID` (sbatch --requeue).
    requeue: bool = False
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir), none, or a checkpoint directory
    # Resuming with settings that change the model or the training trajectory is refused unless this is true;
    # every config that ran stays in config_history.jsonl either way.
    allow_changes: bool = False


@dataclass
class MonitorConfig:
    every_n_epochs: int = 0  # 0: only at the end of training
    k: int = 200
    temperature: float = 0.1
    batch_size: int = 512
    enabled: bool = True
    # A linear head trained every step on the detached backbone features of the training views (labelled rows),
    # scored on the validation split at each monitor call; skipped when the pretraining split has no labels.
    online_linear: bool = True
    # Collapse alarm: one warning (and collapse_alarm: true in metrics.jsonl) when z_std stays below
    # collapse_fraction / sqrt(method.proj_dim) for collapse_patience logged steps in a row (batchssl.collapse).
    collapse_fraction: float = 0.1
    collapse_patience: int = 20


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    batchformer: BatchFormerConfig = field(default_factory=BatchFormerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "[" + ", ".join(_describe(a) for a in typing.get_args(tp)) + "]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise UserError naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except UserError:
                pass
    elif origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: map them back to the word
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in typing.get_args(tp) if a in words), value)
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:  # noqa: SIM102 -- one branch per type, as above
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{key}' expects {_describe(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[last] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if tree is None:
        raise UserError(
            f"config file {path} is empty: a recipe names at least its method and data (start from {DEFAULT_RECIPE})"
        )
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return tree


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each `dotted.key=value` (value read as YAML) in a nested dict; returns the dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def build_config(tree: dict) -> Config:
    """Typed, validated Config from a nested dict."""
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Recipe YAML (default: DEFAULT_RECIPE, Fashion-MNIST MoCo v3 + BatchFormer) plus `dotted.key=value`
    overrides."""
    return build_config(apply_overrides(read_yaml(recipe or DEFAULT_RECIPE), overrides))


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def validate(cfg: Config) -> None:
    """Cross-field and range checks that a type alone cannot express; the first failure raises UserError."""
    d, a, o, t, m = cfg.data, cfg.augment, cfg.optim, cfg.train, cfg.monitor
    checks = [
        (cfg.output_dir.strip() != "", "output_dir must name a directory (it is empty)"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 2, "train.batch_size must be >= 2 (batch statistics need two samples)"),
        (t.log_every_n_steps >= 1, "train.log_every_n_steps must be >= 1"),
        (
            t.max_grad_norm is None or (_finite(t.max_grad_norm) and t.max_grad_norm > 0),
            "train.max_grad_norm must be a positive number or null",
        ),
        (d.limit is None or d.limit >= 1, "data.limit must be >= 1"),
        (d.val_limit is None or d.val_limit >= 1, "data.val_limit must be >= 1"),
        (d.pretrain_limit is None or d.pretrain_limit >= 1, "data.pretrain_limit must be >= 1"),
        (d.holdout >= 0, "data.holdout must be >= 0"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.image_size is None or d.image_size >= 8, "data.image_size must be >= 8 pixels or null"),
        (d.imbalance_ratio >= 1 and _finite(d.imbalance_ratio), "data.imbalance_ratio must be >= 1 (1: balanced)"),
        (
            d.decode != "gpu" or (d.name in ("imagefolder", "shards") and d.pipeline in ("auto", "split")),
            f"data.decode=gpu decodes image files in data.pipeline=split (data.name imagefolder or shards); "
            f"this run has data.name={d.name} data.pipeline={d.pipeline}: remove data.decode=gpu",
        ),
        (a.min_scale is None or 0 < a.min_scale <= 1, "augment.min_scale must be in (0, 1]"),
        (0 <= a.hflip <= 1, "augment.hflip must be a probability in [0, 1]"),
        (a.color_jitter >= 0 and _finite(a.color_jitter), "augment.color_jitter must be >= 0"),
        (_finite(o.base_lr) and o.base_lr > 0, f"optim.base_lr must be a positive number, got {o.base_lr}"),
        (_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
        (all(0 <= b < 1 for b in o.betas), "optim.betas must each be in [0, 1)"),
        (o.warmup_epochs >= 0 and _finite(o.warmup_epochs), "optim.warmup_epochs must be >= 0"),
        (0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio must be in [0, 1]"),
        (_finite(o.bias_lr_ratio) and o.bias_lr_ratio >= 0, "optim.bias_lr_ratio must be >= 0"),
        (
            o.weight_decay_end is None or (_finite(o.weight_decay_end) and o.weight_decay_end >= 0),
            "optim.weight_decay_end must be >= 0 or null (constant weight decay)",
        ),
        (cfg.checkpoint.every_n_epochs >= 0, "checkpoint.every_n_epochs must be >= 0 (0: only at the end)"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (m.every_n_epochs >= 0, "monitor.every_n_epochs must be >= 0 (0: only at the end)"),
        (m.k >= 1, "monitor.k must be >= 1"),
        (_finite(m.temperature) and m.temperature > 0, "monitor.temperature must be > 0"),
        (m.batch_size >= 1, "monitor.batch_size must be >= 1"),
        (m.collapse_fraction > 0 and _finite(m.collapse_fraction), "monitor.collapse_fraction must be > 0"),
        (m.collapse_patience >= 1, "monitor.collapse_patience must be >= 1"),
        (_finite(cfg.method.temperature) and cfg.method.temperature > 0, "method.temperature must be > 0"),
        (0 <= cfg.method.momentum <= 1, "method.momentum must be in [0, 1]"),
        (
            cfg.method.momentum <= cfg.method.momentum_final <= 1,
            "method.momentum_final must be in [method.momentum, 1]",
        ),
        (cfg.method.proj_layers >= 2, "method.proj_layers must be >= 2"),
        (
            min(cfg.method.proj_dim, cfg.method.proj_hidden_dim, cfg.method.pred_hidden_dim) >= 1,
            "method.proj_dim, proj_hidden_dim and pred_hidden_dim must be >= 1",
        ),
        (0 <= cfg.batchformer.dropout < 1, "batchformer.dropout must be in [0, 1)"),
        (cfg.batchformer.nhead >= 1, "batchformer.nhead must be >= 1"),
        (_finite(cfg.batchformer.weight) and cfg.batchformer.weight >= 0, "batchformer.weight must be >= 0"),
        (_finite(cfg.batchformer.lr_scale) and cfg.batchformer.lr_scale >= 0, "batchformer.lr_scale must be >= 0"),
        (cfg.model.width > 0 and _finite(cfg.model.width), "model.width must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def to_dict(cfg: Config) -> dict:
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return {
        f.name: (
            to_dict(getattr(cfg, f.name))
            if dataclasses.is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name))
        )
        for f in dataclasses.fields(cfg)
    }


def dotted_items(tree: dict, prefix: str = "") -> dict:
    """A nested config tree as {'section.key': value} (the form overrides and error messages use)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(run_dir: str | Path) -> Config:
    """The fully resolved config a run directory was trained with."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.yaml: is it a BatchSSL run directory?")
    return build_config(read_yaml(path))

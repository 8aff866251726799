"""Training-step throughput of BatchSSL's SimSiam and MoCo v3, with and without BatchFormer, beside references.

What one "step" is: both views of one batch of N synthetic random images through the model in train mode, the
loss, backward, the optimizer step and zero_grad; images/s counts each image once (N / seconds per step, two views
each). No data loading, no augmentation, one process, no Accelerate wrapper (on one process it adds nothing to
the step but the autocast context this script also applies).

Variants, all on the same batch, the same backbone architecture and the same optimizer type and hyper-parameters:

- ours            `batchssl.methods.build_method(cfg, ...)` with `batchformer.enabled=false`, optimizer from
                  `batchssl.train.build_optimizer(method.parameter_groups(...))`, lr set by `batchssl.train.set_lr`,
                  and the trainer's per-step read-back of the logged dict (`torch.stack(...).tolist()`).
- ours+BF         the same with `batchformer.enabled=true` (scope/position/... from the recipe, else the defaults).
- reference       the step assembled from lightly parts and plain PyTorch only: lightly `ProjectionHead` blocks of
                  the same sizes (SimSiam: + `SimSiamPredictionHead`), SimSiam: lightly `NegativeCosineSimilarity`,
                  D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2; MoCo v3: momentum encoder updated by lightly
                  `update_momentum` with lightly `cosine_schedule`, loss CE(q k^T / tau, arange(N)) * 2 tau per
                  direction, summed. Plain `torch.optim` (or lightly LARS) with the usual decay / no-decay groups;
                  reads its loss back to the host once per step, as any training loop does.
- bare            the backbone alone: forward of both views, sum of the outputs as the loss, backward, the same
                  optimizer over the backbone's parameters.
- ref heads+loss  what the method must compute beyond the backbone, timed alone: the reference's heads and loss
                  (forward + backward, input features requiring grad as in the full step) and their optimizer
                  update; for MoCo v3 also the momentum encoder's forward of both views and `update_momentum`.

Measurement: `--warmup` untimed rounds of one step per variant, then `--repeats` rounds; in every round the
variants run one after the other (bare, then per method: ours, reference, ours+BF, heads+loss), `--steps` steps
each, so slow drifts of the machine (other processes, clocks) hit all variants alike. The bare backbone is timed
once per round with the first method's optimizer settings and serves every method. Each number is the median over rounds; every ratio is the
median of the per-round ratios (each from runs seconds apart). On CUDA the device is synchronised before every
timer read. `--clock wall` (default) times with time.perf_counter; `--clock cpu` with the process's CPU time
(time.process_time, user + kernel), which other processes on a shared CPU barely disturb; use it with
`--threads 1` (with more threads it counts OpenMP spin-waits, and a thread descheduled by another process stalls
every parallel region: on a loaded 2-core machine 2 threads ran 4x slower than 1). The `sys` column is the share of
CPU time spent in the kernel, on the CPU mostly page faults: glibc hands large freed blocks back to the kernel and
every step faults its activations in afresh (10-20 % of a step here); `--mallopt` keeps them in the heap, as a
the trainer does on the CPU (batchssl.cpu.tune_malloc).

Reported per method:
- images/s of every variant, and GFLOP per step (forward + backward, counted by torch.utils.flop_counter on a
  meta-device copy of the model: matmuls and convolutions; the optimizer's element-wise update is not counted);
- ours / reference (target >= 1.00x);
- ours' overhead beyond bare + heads+loss: t_ours / (t_bare + t_heads+loss) - 1, where the heads+loss share is
  measured by TIMING the reference's heads and loss alone (the FLOP share of heads+loss is printed beside it for
  comparison). The same number for the reference shows how additive the decomposition is on this machine;
- BatchFormer's cost: (t_ours+BF - t_ours) / t_ours+BF, in % of the BatchFormer step, beside (a) the FLOP share
  of the BatchFormer layer alone (QKV/out projections + attention matmuls + FFN; FlopCounterMode's per-module
  count, checked against the closed form 3 x 2 x [M C (3C) + M C C + 2 M^2 C + 2 M C F], M tokens, C width,
  F FFN width) and (b) the FLOP share of everything BatchFormer adds (the layer plus the predictor and loss running
  on the doubled batch of the second stream).

Run (from the repository root, in the project's environment):

    python benchmarks/train_throughput.py --preset fashion --repeats 3
    python benchmarks/train_throughput.py --preset fashion --repeats 3 --threads 1 --clock cpu   # shared CPU
    python benchmarks/train_throughput.py --preset cifar10 --batch 64 --repeats 3      # CPU: a smaller batch
    python benchmarks/train_throughput.py --preset cifar10 --device cuda --amp bf16    # GPU, batch 512
    python benchmarks/train_throughput.py --config recipes/fashion_mnist/mocov3_bf.yaml --methods mocov3

Presets (backbone, image size, batch; heads per method):
- fashion: Fashion-MNIST recipes (recipes/fashion_mnist/<method>.yaml): ResNet-18 width 0.25, CIFAR stem, 28 px,
  1 channel, batch 256; SimSiam 2-layer 512-512 projector, 512-128-512 predictor; MoCo v3 2-layer 512-128
  projector, 128-512-128 predictor.
- cifar10: ResNet-18 full width, CIFAR stem, 32 px, 3 channels, batch 512; SimSiam's CIFAR heads (2-layer
  2048-2048 projector, 2048-512-2048 predictor); MoCo v3's ResNet heads (3-layer 4096-256 projector, 256-4096-256
  predictor); optimizer of the Fashion-MNIST recipes (SGD, momentum 0.9).
--config RECIPE instead takes backbone, image size and batch from the recipe; the heads and optimizer of a method
come from the recipe when it is that method's, else from a sibling recipe `<dir>/<method>.yaml` (or
`<method>_bf.yaml`) when there is one, else from the recipe with only method.name switched. The header says which.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import ProjectionHead, SimSiamPredictionHead
from lightly.models.utils import update_momentum
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from batchssl.backbones import build_backbone
from batchssl.config import Config, load_config
from batchssl.cpu import tune_malloc
from batchssl.data import dataset_info
from batchssl.errors import UserError
from batchssl.methods import build_method
from batchssl.train import build_optimizer, lr_at, peak_lr, set_lr

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "fashion_mnist" / "simsiam_bf.yaml"
METHOD_NAMES = ("simsiam", "mocov3")
TOTAL_STEPS = 10_000  # schedule length the lr / momentum schedules are evaluated against (any value works)

PRESETS: dict[str, dict] = {
    "fashion": {
        "recipe": {m: ROOT / "recipes" / "fashion_mnist" / f"{m}.yaml" for m in METHOD_NAMES},
        "common": ["data.name=fashion_mnist", "data.image_size=null", "model.arch=resnet18", "model.width=0.25",
                   "model.stem=auto", "train.batch_size=256"],
        "method": {"simsiam": [], "mocov3": []},
    },
    "cifar10": {
        "recipe": {m: ROOT / "recipes" / "fashion_mnist" / f"{m}.yaml" for m in METHOD_NAMES},
        "common": ["data.name=cifar10", "data.image_size=null", "model.arch=resnet18", "model.width=1.0",
                   "model.stem=cifar", "train.batch_size=512"],
        "method": {
            "simsiam": ["method.proj_hidden_dim=2048", "method.proj_dim=2048", "method.proj_layers=2",
                        "method.pred_hidden_dim=512"],
            "mocov3": ["method.proj_hidden_dim=4096", "method.proj_dim=256", "method.proj_layers=3",
                       "method.temperature=0.2"],
        },
    },
}


# ----------------------------------------------------------------------------------------------------- configs


def method_configs(args) -> tuple[dict[str, Config], dict[str, str]]:
    """Per method, its Config (batchformer disabled) and where its heads came from."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHOD_NAMES:
            raise UserError(f"--methods: unknown method '{m}' (known: {', '.join(METHOD_NAMES)})")
    extra = [f"train.batch_size={args.batch}"] if args.batch else []
    cfgs, sources = {}, {}
    if args.preset:
        preset = PRESETS[args.preset]
        for m in methods:
            recipe = preset["recipe"][m]
            cfgs[m] = load_config(recipe, preset["common"] + preset["method"][m] + [f"method.name={m}"] + extra)
            sources[m] = f"preset {args.preset} (base {recipe.relative_to(ROOT)})"
    else:
        path = Path(args.config)
        main = load_config(path, extra)
        for m in methods:
            cfg, source = main, f"{path} (method.name switched to {m})"
            if main.method.name == m:
                source = str(path)
            else:
                for sibling in (path.parent / f"{m}.yaml", path.parent / f"{m}_bf.yaml"):
                    if sibling.is_file():
                        sib = load_config(sibling)
                        bf = main.batchformer if main.batchformer.enabled else sib.batchformer
                        cfg = dataclasses.replace(main, method=sib.method, optim=sib.optim, batchformer=bf)
                        source = f"{sibling} (heads, optimizer); {path} (backbone, batch)"
                        break
            cfgs[m] = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=m))
            sources[m] = source
    for m, cfg in cfgs.items():
        cfgs[m] = dataclasses.replace(cfg, batchformer=dataclasses.replace(cfg.batchformer, enabled=False))
    return cfgs, sources


def with_batchformer(cfg: Config) -> Config:
    return dataclasses.replace(cfg, batchformer=dataclasses.replace(cfg.batchformer, enabled=True))


# ---------------------------------------------------------------------------------------------------- variants


def split_decay(params, weight_decay: float) -> list[dict]:
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def plain_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """The reference's optimizer: the recipe's optimizer type and hyper-parameters, plain torch / lightly."""
    o = cfg.optim
    groups = split_decay(params, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)
    if o.name == "lars":
        return LARS(groups, lr=0.0, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=o.betas)


class Variant:
    """One way of doing a training step. Subclasses set self.model (an nn.Module holding everything) and define
    loss(views, step) -> (loss, 1-D tensor of what is read back to the host every step)."""

    name: str
    model: nn.Module

    def __init__(self, cfg: Config, build_optimizer_now: bool):
        self.cfg = cfg
        self.peak = peak_lr(cfg)
        self.warmup = int(round(cfg.optim.warmup_epochs * 100))
        self.optimizer = self.make_optimizer() if build_optimizer_now else None

    def make_optimizer(self) -> torch.optim.Optimizer:
        return plain_optimizer(self.model.parameters(), self.cfg)

    def set_lr(self, step: int) -> None:
        lr = lr_at(step, TOTAL_STEPS, self.warmup, self.peak)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss(self, views, step):
        raise NotImplementedError


class Ours(Variant):
    def __init__(self, cfg, backbone, feature_dim, device, build_optimizer_now=True):
        self.model = build_method(cfg, backbone, feature_dim).to(device).train()
        self.name = "ours+BF" if cfg.batchformer.enabled else "ours"
        super().__init__(cfg, build_optimizer_now)

    def make_optimizer(self):
        return build_optimizer(self.model.parameter_groups(self.cfg.optim), self.cfg.optim)

    def set_lr(self, step):
        set_lr(self.optimizer, lr_at(step, TOTAL_STEPS, self.warmup, self.peak), self.peak)

    def loss(self, views, step):
        out = self.model(views, step, TOTAL_STEPS)
        names = sorted(out)  # exactly what batchssl.train reads back every step
        return out["loss"], torch.stack([out[k].detach().float().to(views[0].device) for k in names])


def simsiam_heads(cfg: Config, feature_dim: int) -> nn.ModuleDict:
    mc = cfg.method
    blocks = [(feature_dim, mc.proj_hidden_dim, nn.BatchNorm1d(mc.proj_hidden_dim), nn.ReLU())]
    blocks += [(mc.proj_hidden_dim, mc.proj_hidden_dim, nn.BatchNorm1d(mc.proj_hidden_dim), nn.ReLU())
               for _ in range(mc.proj_layers - 2)]
    blocks += [(mc.proj_hidden_dim, mc.proj_dim, nn.BatchNorm1d(mc.proj_dim, affine=False), None)]
    return nn.ModuleDict({"projector": ProjectionHead(blocks),
                          "predictor": SimSiamPredictionHead(mc.proj_dim, mc.pred_hidden_dim, mc.proj_dim)})


def mocov3_heads(cfg: Config, feature_dim: int) -> nn.ModuleDict:
    mc = cfg.method
    hid, out = mc.proj_hidden_dim, mc.proj_dim
    proj = [(feature_dim, hid, nn.BatchNorm1d(hid), nn.ReLU(), False)]
    proj += [(hid, hid, nn.BatchNorm1d(hid), nn.ReLU(), False) for _ in range(mc.proj_layers - 2)]
    proj += [(hid, out, nn.BatchNorm1d(out, affine=False), None, False)]
    pred = [(out, hid, nn.BatchNorm1d(hid), nn.ReLU(), False), (hid, out, None, None, False)]
    return nn.ModuleDict({"projector": ProjectionHead(proj), "predictor": ProjectionHead(pred)})


def moco_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(q @ k.T / tau, labels) * (2.0 * tau)


class Reference(Variant):
    """The same step from lightly parts and plain PyTorch. heads_only: the heads and loss on given features
    (plus, for MoCo v3, the momentum encoder's forward and update), i.e. what a method adds to the bare backbone."""

    def __init__(self, cfg, backbone, feature_dim, device, build_optimizer_now=True, heads_only=False):
        self.method, self.heads_only = cfg.method.name, heads_only
        self.name = "ref heads+loss" if heads_only else "reference"
        heads = simsiam_heads(cfg, feature_dim) if self.method == "simsiam" else mocov3_heads(cfg, feature_dim)
        self.model = nn.ModuleDict({"backbone": backbone, **heads})
        if self.method == "mocov3":
            self.model["backbone_momentum"] = copy.deepcopy(backbone).requires_grad_(False)
            self.model["projector_momentum"] = copy.deepcopy(heads["projector"]).requires_grad_(False)
        self.criterion = NegativeCosineSimilarity()
        self.model.to(device).train()
        self.features = None
        if heads_only:  # backbone outputs stand-ins; requires_grad so backward computes d loss / d features too
            n = cfg.train.batch_size
            self.features = [torch.randn(n, feature_dim, device=device, requires_grad=True) for _ in range(2)]
        super().__init__(cfg, build_optimizer_now)

    def make_optimizer(self):
        if self.heads_only:
            params = [p for name in ("projector", "predictor") for p in self.model[name].parameters()]
        else:
            params = self.model.parameters()
        return plain_optimizer(params, self.cfg)

    def loss(self, views, step):
        mdl = self.model
        if self.heads_only:
            for h in self.features:
                h.grad = None
            h1, h2 = self.features
        else:
            h1, h2 = mdl["backbone"](views[0]), mdl["backbone"](views[1])
        z1, z2 = mdl["projector"](h1), mdl["projector"](h2)
        p1, p2 = mdl["predictor"](z1), mdl["predictor"](z2)
        if self.method == "simsiam":
            loss = 0.5 * (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach()))
        else:
            m = cosine_schedule(step, TOTAL_STEPS, self.cfg.method.momentum, 1.0)
            with torch.no_grad():
                update_momentum(mdl["backbone"], mdl["backbone_momentum"], m)
                update_momentum(mdl["projector"], mdl["projector_momentum"], m)
                k1, k2 = (mdl["projector_momentum"](mdl["backbone_momentum"](x)) for x in views)
            tau = self.cfg.method.temperature
            loss = moco_ctr(p1, k2, tau) + moco_ctr(p2, k1, tau)
        return loss, loss.detach().reshape(1)


class Bare(Variant):
    def __init__(self, cfg, backbone, feature_dim, device, build_optimizer_now=True):
        self.name = "bare backbone"
        self.model = backbone.to(device).train()
        super().__init__(cfg, build_optimizer_now)

    def loss(self, views, step):
        loss = self.model(views[0]).sum() + self.model(views[1]).sum()
        return loss, loss.detach().reshape(1)


def make_variant(kind: str, cfg: Config, device, build_optimizer_now=True) -> Variant:
    info = dataset_info(cfg.data)
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    if kind == "ours":
        return Ours(cfg, backbone, feature_dim, device, build_optimizer_now)
    if kind == "ours_bf":
        return Ours(with_batchformer(cfg), backbone, feature_dim, device, build_optimizer_now)
    if kind == "reference":
        return Reference(cfg, backbone, feature_dim, device, build_optimizer_now)
    if kind == "heads":
        return Reference(cfg, backbone, feature_dim, device, build_optimizer_now, heads_only=True)
    return Bare(cfg, backbone, feature_dim, device, build_optimizer_now)


def make_views(cfg: Config, device, generator=None) -> list[torch.Tensor]:
    info = dataset_info(cfg.data)
    shape = (cfg.train.batch_size, info.in_channels, info.image_size, info.image_size)
    if device == "meta" or getattr(device, "type", None) == "meta":
        return [torch.empty(shape, device="meta") for _ in range(2)]
    return [torch.randn(shape, generator=generator).to(device) for _ in range(2)]


# ------------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(v: Variant, views, step: int, autocast) -> None:
    v.set_lr(step)
    with autocast():
        loss, logged = v.loss(views, step)
    logged.tolist()  # the per-step read-back (logging, NaN check): one host sync
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def _sys_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime if resource else 0.0


def timed_run(v: Variant, views, steps: int, first_step: int, autocast, device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, of which in the kernel) per step over `steps` consecutive steps."""
    gc.collect()
    synchronize(device)
    wall, cpu, kernel = time.perf_counter(), time.process_time(), _sys_seconds()
    for i in range(steps):
        train_step(v, views, first_step + i, autocast)
    synchronize(device)
    return ((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps,
            (_sys_seconds() - kernel) / steps)


# ------------------------------------------------------------------------------------------------------- FLOPs


def count_flops(kind: str, cfg: Config) -> tuple[float, float | None]:
    """(FLOPs of one step's forward + backward, FLOPs of the BatchFormer layer in it) on a meta-device copy."""
    with torch.device("meta"):
        v = make_variant(kind, cfg, "meta", build_optimizer_now=False)
        if isinstance(v, Reference) and v.heads_only:
            v.features = [torch.empty_like(h, device="meta").requires_grad_(True) for h in v.features]
    views = make_views(cfg, "meta")
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        loss, _ = v.loss(views, 1)
        loss.backward()
    bf = None
    for name, ops in counter.get_flop_counts().items():
        if name.endswith(".batchformer.layer"):
            bf = float(sum(ops.values()))
    return float(counter.get_total_flops()), bf


def batchformer_flops_closed_form(cfg: Config, feature_dim: int) -> float:
    """Forward + backward (3x forward) FLOPs of the BatchFormer layer, from its shapes."""
    bf, n = cfg.batchformer, cfg.train.batch_size
    width = cfg.method.proj_dim if bf.position == "projector" else feature_dim
    ffn = width  # batchssl.batchformer: dim_feedforward = dim

    def layer_macs(tokens: int) -> int:  # QKV + out projection + QK^T + AV + FFN
        return tokens * width * 3 * width + tokens * width * width + 2 * tokens * tokens * width \
            + 2 * tokens * width * ffn

    macs = layer_macs(2 * n) if bf.scope == "joint" else 2 * layer_macs(n)
    return 3 * 2 * float(macs)


# ----------------------------------------------------------------------------------------------------- profile


def profile(variants: list[Variant], views, autocast, device, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for v in variants:
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                train_step(v, views, 100 + i, autocast)
            synchronize(device)
        print(f"\n--- torch.profiler: {v.cfg.method.name} / {v.name}, {steps} step(s), top {rows} by self time ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


# ------------------------------------------------------------------------------------------------------ report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return name


def describe(cfg: Config) -> str:
    info = dataset_info(cfg.data)
    mc, m = cfg.model, cfg.method
    stem = mc.stem if mc.stem != "auto" else ("cifar" if info.image_size < 64 else "imagenet")
    heads = f"projector {m.proj_layers}-layer {m.proj_hidden_dim}-{m.proj_dim}"
    if m.name == "simsiam":
        heads += f", predictor {m.proj_dim}-{m.pred_hidden_dim}-{m.proj_dim}"
    else:
        heads += f", predictor {m.proj_dim}-{m.proj_hidden_dim}-{m.proj_dim}, tau {m.temperature}"
    bf = cfg.batchformer
    return (f"{mc.arch} width {mc.width} ({stem} stem), {info.image_size} px x {info.in_channels} ch, "
            f"batch {cfg.train.batch_size}; {heads}; optimizer {cfg.optim.name}; BatchFormer scope {bf.scope}, "
            f"position {bf.position}, nhead {bf.nhead}, dropout {bf.dropout}, weight {bf.weight}")


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", default=str(DEFAULT_RECIPE),
                     help="recipe for backbone, image size, batch (and heads); default %(default)s")
    src.add_argument("--preset", choices=sorted(PRESETS), help="fashion or cifar10 (see the module docstring)")
    parser.add_argument("--methods", default="simsiam,mocov3", help="comma-separated subset of simsiam,mocov3")
    parser.add_argument("--batch", type=int, help="override the batch size (images per step, 2 views each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timed run (default: 1 on the CPU, where one step takes seconds; 20 on CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="no", choices=["no", "bf16"], help="bf16 autocast around the forward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: time.perf_counter (default); cpu: the process's CPU time (time.process_time), "
                             "robust on a CPU shared with other processes, meaningful with --threads 1 (with more "
                             "threads it counts OpenMP spin-waits)")
    parser.add_argument("--mallopt", action="store_true",
                        help="CPU, glibc: keep freed memory in the heap (see tune_malloc) before building anything")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler tables of ours and the reference per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.steps is None:
        args.steps = 20 if args.device == "cuda" else 1
    try:
        if args.batch is not None and args.batch < 2:
            raise UserError("--batch must be >= 2 (batch norm needs two samples)")
        if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
            raise UserError("--repeats and --steps must be >= 1, --warmup >= 0")
        if args.device == "cuda" and args.clock == "cpu":
            raise UserError("--clock cpu measures CPU time; on CUDA use the default --clock wall")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        cfgs, sources = method_configs(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.amp == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    malloc = tune_malloc() if args.mallopt else "default"
    methods = list(cfgs)
    first = cfgs[methods[0]]
    batch = first.train.batch_size
    print(f"machine: {machine(device)} | device {device.type} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | amp {args.amp} | python {platform.python_version()}")
    print(f"timing: {args.warmup} warmup round(s), {args.repeats} timed round(s) x {args.steps} step(s) per "
          f"variant, {args.clock} clock; synthetic random images; medians over rounds; malloc {malloc}"
          + (f" (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})" if os.environ.get("GLIBC_TUNABLES") else ""))
    for m in methods:
        print(f"{m}: {describe(cfgs[m])}\n  from {sources[m]}")

    # Build everything first (same seed for every variant's weights), then alternate.
    variants: dict[str, dict[str, Variant]] = {}
    torch.manual_seed(args.seed)
    bare = make_variant("bare", first, device)
    for m in methods:
        variants[m] = {}
        for kind in ("ours", "reference", "ours_bf", "heads"):
            torch.manual_seed(args.seed)
            variants[m][kind] = make_variant(kind, cfgs[m], device)
    gen = torch.Generator().manual_seed(args.seed)
    views = make_views(first, device, gen)
    order = [("-", "bare", bare)] + [(m, k, v) for m in methods for k, v in variants[m].items()]

    times: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in order}  # the --clock's seconds
    other: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in order}  # the other clock's
    kernel: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in order}  # sys / CPU time
    step = 0
    load_before = _load()
    started = time.perf_counter()
    for round_ in range(args.warmup + args.repeats):
        steps = args.steps if round_ >= args.warmup else 1  # a warmup run is one step (allocations, kernels)
        for m, k, v in order:
            wall, cpu, sys_s = timed_run(v, views, steps, step, autocast, device)
            step += steps
            if round_ >= args.warmup:
                kernel[(m, k)].append(sys_s / max(cpu, 1e-9))
                times[(m, k)].append(cpu if args.clock == "cpu" else wall)
                other[(m, k)].append(wall if args.clock == "cpu" else cpu)
    elapsed = time.perf_counter() - started

    flops: dict[tuple[str, str], float] = {}
    bf_layer: dict[str, tuple[float | None, float]] = {}
    if not args.no_flops:
        flops[("-", "bare")], _ = count_flops("bare", first)
        for m in methods:
            for k in ("ours", "reference", "ours_bf", "heads"):
                flops[(m, k)], layer = count_flops(k, cfgs[m])
                if k == "ours_bf":
                    with torch.device("meta"):
                        fd = build_backbone(cfgs[m].model, *_in_size(cfgs[m]))[1]
                    bf_layer[m] = (layer, batchformer_flops_closed_form(with_batchformer(cfgs[m]), fd))

    # ---- table
    med = {key: statistics.median(ts) for key, ts in times.items()}
    label = {"bare": "bare backbone (fwd+bwd, sum loss)", "ours": "ours", "reference": "reference (lightly + torch)",
             "ours_bf": "ours + BatchFormer", "heads": "ref heads+loss alone"}
    print(f"\nbatch {batch} images (x2 views) per step; {elapsed:.0f} s of timing; 1-min load average "
          f"{load_before:.1f} before, {_load():.1f} after (above the thread count: other processes share the CPU)")
    other_name = "wall ms" if args.clock == "cpu" else "CPU ms"
    header = (f"{'method':<8} {'variant':<34} {args.clock + ' ms':>9} {'images/s':>9} {'spread':>7} "
              f"{other_name:>9} {'sys':>5} {'GFLOP/step':>11}")
    print(header)
    print("-" * len(header))
    for m, k, _ in order:
        ts = times[(m, k)]
        spread = (max(ts) - min(ts)) / med[(m, k)] * 100
        gf = f"{flops[(m, k)] / 1e9:11.2f}" if flops else f"{'-':>11}"
        alt = statistics.median(other[(m, k)]) * 1e3
        sys_pct = statistics.median(kernel[(m, k)]) * 100
        print(f"{m:<8} {label[k]:<34} {med[(m, k)] * 1e3:9.1f} {batch / med[(m, k)]:9.1f} {spread:6.1f}% "
              f"{alt:9.1f} {sys_pct:4.0f}% {gf}")
    per = "per CPU-second of this process" if args.clock == "cpu" else "per second of wall time"
    print(f"(ms per step and images/s {per}, medians; spread: (max - min) / median over the timed rounds; "
          f"{other_name}: the other clock, median; sys: share of the CPU time spent in the kernel, mostly page "
          f"faults of freshly allocated memory; GFLOP: forward + backward matmuls/convolutions)")

    print()
    t_bare = times[("-", "bare")]
    for m in methods:
        t = {k: times[(m, k)] for k in ("ours", "reference", "ours_bf", "heads")}
        expected = [b + h for b, h in zip(t_bare, t["heads"])]
        speed = median_ratio(t["reference"], t["ours"])
        over = (median_ratio(t["ours"], expected) - 1) * 100
        over_ref = (median_ratio(t["reference"], expected) - 1) * 100
        heads_time = median_ratio(t["heads"], expected) * 100
        bf_cost = statistics.median((b - o) / b for b, o in zip(t["ours_bf"], t["ours"])) * 100
        print(f"{m}:")
        print(f"  ours / reference (images/s)          {speed:6.3f}x   (target >= 1.00x)")
        line = f"  heads+loss share, by timing alone     {heads_time:5.1f} %  of bare + heads+loss"
        if flops:
            fl_share = (flops[(m, 'reference')] - flops[('-', 'bare')]) / flops[(m, 'reference')] * 100
            line += f"   (by FLOPs: {fl_share:.1f} % of the reference step)"
        print(line)
        print(f"  ours over bare beyond heads+loss      {over:+5.1f} %  "
              f"(reference: {over_ref:+.1f} %; t / (t_bare + t_heads+loss) - 1, heads+loss timed)")
        line = f"  BatchFormer cost, time               {bf_cost:5.1f} %  of the ours+BF step"
        if flops:
            layer, closed = bf_layer[m]
            f_bf = flops[(m, "ours_bf")]
            added = (f_bf - flops[(m, "ours")]) / f_bf * 100
            layer_txt = f"{layer / f_bf * 100:.1f} %" if layer is not None else "n/a"
            line += (f"\n  BatchFormer FLOPs: layer {layer_txt} of the step "
                     f"({(layer or 0) / 1e9:.2f} GFLOP; closed form {closed / 1e9:.2f} GFLOP), "
                     f"all it adds (layer + doubled predictor/loss) {added:.1f} %")
        print(line)

    if args.profile:
        profile([v for m in methods for k, v in variants[m].items() if k in ("ours", "reference")],
                views, autocast, device, steps=args.steps, rows=25)
    return 0


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _in_size(cfg: Config) -> tuple[int, int]:
    info = dataset_info(cfg.data)
    return info.in_channels, info.image_size


if __name__ == "__main__":
    sys.exit(main())

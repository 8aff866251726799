"""Training-step throughput of one recipe in several variants (precision, memory format, BatchFormer, real views),
side by side in one process, from the library's own parts.

One step is what the trainer does (batchssl.train): the model and optimiser made by `batchssl.build.build_model`
(as every run builds them), the scheduled lr (`build.Schedule.apply` over the method's parameter
groups), then `batchssl.train.train_step` (forward of both views, backward through the Accelerator, optimiser
step, zero_grad). images/s counts each image once (two views each).

Variants (`--variants`, comma-separated; each a '+'-joined set of tokens, the first variant is the reference):
  fp32   float32, contiguous (NCHW): no tokens; the default reference
  cl     channels_last backbone and views       bf16   bf16 autocast around the forward (as Accelerate does)
  nobf   batchformer.enabled=false              bf     batchformer.enabled=true
  compile        the backbone under torch.compile (train.compile=backbone, the trainer's Module.compile)
  compilemodel   the whole method's forward under torch.compile (train.compile=model)
  real   views made by batchssl.views.DeviceViews from uint8 images held on the device (the Fashion-MNIST
         training split, or random uint8 images of its shape when the data is not installed), instead of fixed
         synthetic random views; `--real` adds the reference + real and prints real / synthetic
Default: fp32,cl,bf16,bf16+cl,nobf.

Measurement: every variant is built first (same seed, same initial weights), runs `--warmup` untimed steps, then
`--repeats` rounds in which the variants take turns (round-robin), `--steps` steps each, timed with
time.perf_counter around whole steps (views included; on CUDA synchronised before each read), so that other
processes and clock changes hit all variants alike. ms/step and images/s are medians over rounds; "x ref" is
the median over rounds of the reference's time / the variant's time (> 1: faster than the reference).

    python benchmarks/train_throughput.py                                  # default recipe, default variants
    python benchmarks/train_throughput.py --quick                          # ~20 s smoke run
    python benchmarks/train_throughput.py --config recipes/fashion_mnist/simsiam_bf.yaml --variants fp32,bf16+cl --real
    python benchmarks/train_throughput.py --variants bf16+cl,bf16+cl+compile,bf16+cl+compilemodel --warmup 3
    python benchmarks/train_throughput.py data.name=cifar10 model.width=1.0 train.batch_size=512   # overrides
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from batchssl.build import Schedule, build_model
from batchssl.config import Config, load_config
from batchssl.cpu import tune_malloc
from batchssl.data import DatasetInfo, dataset_info, load_split
from batchssl.distributed import make_accelerator
from batchssl.errors import UserError, exit_on_user_error
from batchssl.train import train_step
from batchssl.views import DeviceViews

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "fashion_mnist" / "mocov3_bf.yaml"
DEFAULT_VARIANTS = "fp32,cl,bf16,bf16+cl,nobf"
TOKENS = {
    "fp32": {},
    "cl": {"channels_last": True},
    "channels_last": {"channels_last": True},
    "bf16": {"bf16": True},
    "nobf": {"batchformer": False},
    "bf": {"batchformer": True},
    "real": {"real": True},
    "compile": {"compile": "backbone"},
    "compilemodel": {"compile": "model"},
}
TOTAL_STEPS, STEPS_PER_EPOCH = 10_000, 100  # nominal schedule length the lr / momentum are evaluated against


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    channels_last: bool = False
    bf16: bool = False
    batchformer: bool | None = None  # None: as the recipe says
    real: bool = False
    compile: str = "none"  # as train.compile: none, backbone, model

    def synthetic_twin(self) -> str:
        return "+".join(t for t in self.name.split("+") if t != "real") or "fp32"


def parse_variant(name: str) -> Spec:
    fields: dict = {}
    for token in name.split("+"):
        if token not in TOKENS:
            raise UserError(f"--variants: unknown token '{token}' in '{name}' (known: {', '.join(TOKENS)})")
        fields.update(TOKENS[token])
    return Spec(name, **fields)


# ------------------------------------------------------------------------------------------------------- views
# make_views(step) -> [view1, view2]: the hook a variant's data comes through. Synthetic views are fixed random
# tensors (no data cost); real views run the trainer's device-side augmentation on uint8 images on the device.


def synthetic_views(cfg: Config, info: DatasetInfo, device, memory_format, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, info.in_channels, info.image_size, info.image_size)
    views = [
        torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format) for _ in range(2)
    ]

    def make_views(step: int) -> list[torch.Tensor]:
        return views

    return make_views


def load_uint8_images(cfg: Config, info: DatasetInfo, device) -> tuple[torch.Tensor, str]:
    """The training split as a uint8 (N, C, H, W) tensor on the device, or random uint8 images of the dataset's
    shape (16 batches) when it is not installed or not held as an array; the note says which."""
    try:
        ds = load_split(cfg.data, "pretrain")
        array = getattr(ds, "images", None)
        if array is None:
            raise UserError(f"{cfg.data.name} is not held in memory as an array")
        images = torch.from_numpy(array.copy())
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
        return images.to(device), f"{cfg.data.name} training split, {len(images)} images"
    except UserError as err:
        generator = torch.Generator().manual_seed(cfg.seed)
        shape = (16 * cfg.train.batch_size, info.in_channels, info.image_size, info.image_size)
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        return images.to(device), f"RANDOM uint8 images {tuple(shape)} ({err})"


def real_views(cfg: Config, info: DatasetInfo, images: torch.Tensor, memory_format, seed: int):
    device_views = DeviceViews(cfg, info)
    batch, per_epoch = cfg.train.batch_size, len(images) // cfg.train.batch_size
    order: dict[int, torch.Tensor] = {}

    def make_views(step: int) -> list[torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in order:  # one permutation per epoch, seeded like the trainer's sampler
            order.clear()
            order[epoch] = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
        rows = order[epoch][i * batch : (i + 1) * batch].to(images.device, non_blocking=True)
        return [v.contiguous(memory_format=memory_format) for v in device_views(images[rows], seed, epoch, step)]

    return make_views


# ---------------------------------------------------------------------------------------------------- variants


class Autocast(nn.Module):
    """The method with its forward under bf16 autocast, as Accelerate's mixed_precision='bf16' wraps it (one
    Accelerator serves every variant, and its precision is fixed per process)."""

    def __init__(self, method: nn.Module, device_type: str):
        super().__init__()
        self.method, self.device_type = method, device_type

    def forward(self, views, step, total_steps):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.method(views, step, total_steps)


class Variant:
    def __init__(self, spec: Spec, cfg: Config, accelerator, images: torch.Tensor | None, seed: int):
        self.spec, self.cfg, self.accelerator, self.step = spec, cfg, accelerator, 0
        device, info = accelerator.device, dataset_info(cfg.data)
        fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        torch.manual_seed(seed)  # the same initial weights in every variant
        # The trainer's model (channels_last and train.compile from the variant's config, which sets them; compiled
        # on the first steps: keep --warmup >= 2), in bf16 autocast where the variant asks for it.
        wrap = (lambda method: Autocast(method, device.type)) if spec.bf16 else None
        self.model, self.optimizer, _ = build_model(cfg, info, accelerator, wrap=wrap)
        self.model.train()
        self.schedule = Schedule(cfg, TOTAL_STEPS, int(round(cfg.optim.warmup_epochs * STEPS_PER_EPOCH)))
        self.make_views = (
            real_views(cfg, info, images, fmt, seed) if spec.real else synthetic_views(cfg, info, device, fmt, seed)
        )

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` consecutive steps (views, lr, train_step)."""
        sync(self.accelerator.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.schedule.apply(self.optimizer, self.step)
            train_step(
                self.model,
                self.optimizer,
                self.accelerator,
                self.make_views(self.step),
                self.step,
                TOTAL_STEPS,
                self.cfg.train,
            )
            self.step += 1
        sync(self.accelerator.device)
        return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_config(args, spec: Spec) -> Config:
    extra = [f"train.batch_size={args.batch}"] if args.batch else []
    extra += [f"train.channels_last={str(spec.channels_last).lower()}", f"train.compile={spec.compile}"]
    if spec.batchformer is not None:
        extra.append(f"batchformer.enabled={str(spec.batchformer).lower()}")
    return load_config(args.config, list(args.overrides) + extra)


def describe(cfg: Config) -> str:
    info, m, bf = dataset_info(cfg.data), cfg.method, cfg.batchformer
    bf_text = f"scope {bf.scope}, position {bf.position}" if bf.enabled else "off"
    return (
        f"{m.name}, {cfg.model.arch} width {cfg.model.width}, {info.image_size} px x {info.in_channels} ch, "
        f"batch {cfg.train.batch_size}, projector {m.proj_layers}-layer {m.proj_hidden_dim}-{m.proj_dim}, "
        f"optimizer {cfg.optim.name}, BatchFormer {bf_text}"
    )


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, dotted.key=value")
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe (default %(default)s)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated (default %(default)s)")
    parser.add_argument("--real", action="store_true", help="add the reference with DeviceViews on real images")
    parser.add_argument("--batch", type=int, help="global batch (default: the recipe's train.batch_size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, median over them (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (CPU 2, CUDA 20)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--mallopt",
        action="store_true",
        help="keep freed memory in glibc's heap (batchssl.cpu.tune_malloc), as the trainer does on CPU",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (~20 s): batch 32, 1 warmup step, 2 rounds of 1 step, 1 thread"
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count in the header")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args(argv)
    if args.quick:
        args.batch, args.warmup, args.repeats, args.steps = args.batch or 32, 1, 2, args.steps or 1
        args.threads = args.threads or 1
    if any("=" not in o for o in args.overrides):
        raise UserError(f"overrides must be dotted.key=value, got {[o for o in args.overrides if '=' not in o]}")
    if args.batch is not None and args.batch < 2:
        raise UserError("--batch must be >= 2 (batch norm needs two samples)")
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        raise UserError("--repeats and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    with exit_on_user_error("train_throughput.py"):
        args = parse_args(argv)
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        if args.real:
            names.append(f"{names[0]}+real" if names[0] != "fp32" else "real")
        specs = [parse_variant(n) for n in dict.fromkeys(names)]
        for spec in [s for s in specs if s.real]:  # real / synthetic needs the synthetic twin
            if spec.synthetic_twin() not in {s.name for s in specs}:
                specs.append(parse_variant(spec.synthetic_twin()))
        cfgs = {s.name: variant_config(args, s) for s in specs}
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.mallopt else "default malloc"
    accelerator = make_accelerator()
    device = accelerator.device
    steps = args.steps or (20 if device.type == "cuda" else 2)
    ref = specs[0].name
    ref_cfg = cfgs[ref]
    batch = ref_cfg.train.batch_size

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"{machine} | {device.type} | torch {torch.__version__} | {torch.get_num_threads()} threads | {malloc}")
    print(f"recipe {args.config} {' '.join(args.overrides)}\n  {describe(ref_cfg)}")
    print(
        f"timing: {args.warmup} warmup step(s), then {args.repeats} round(s) x {steps} step(s) per variant, "
        "round-robin, time.perf_counter; medians over rounds"
    )
    if not args.no_flops:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from flops import step_flops

        for bf in sorted({c.batchformer.enabled for c in cfgs.values()}, reverse=True):
            cfg = next(c for c in cfgs.values() if c.batchformer.enabled == bf)
            total, layer = step_flops(cfg, TOTAL_STEPS)
            print(
                f"  GFLOP per step (fwd+bwd, counted), BatchFormer {'on' if bf else 'off'}: {total / 1e9:.1f}"
                + (f" (layer {layer / 1e9:.2f})" if layer else "")
            )

    images = None
    if any(s.real for s in specs):
        real_cfg = cfgs[next(s.name for s in specs if s.real)]
        images, note = load_uint8_images(real_cfg, dataset_info(real_cfg.data), device)
        print(f"  real views: batchssl.views.DeviceViews on {note}")
    variants = [Variant(s, cfgs[s.name], accelerator, images, args.seed) for s in specs]
    for v in variants:
        if args.warmup:
            v.run(args.warmup)

    times: dict[str, list[float]] = {v.spec.name: [] for v in variants}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for v in variants:
            times[v.spec.name].append(v.run(steps))
    elapsed = time.perf_counter() - started

    def speedup(name: str, over: str) -> float:  # median of per-round ratios: rounds are seconds apart
        return statistics.median(a / b for a, b in zip(times[over], times[name]))

    print(f"\nbatch {batch} images (x2 views) per step; {elapsed:.0f} s of timed rounds")
    header = f"{'variant':<16} {'ms/step':>9} {'images/s':>9} {'spread':>7} {'x ref':>7}"
    print(header + "\n" + "-" * len(header))
    for v in variants:
        name, ts = v.spec.name, times[v.spec.name]
        med = statistics.median(ts)
        print(
            f"{name:<16} {med * 1e3:9.1f} {cfgs[name].train.batch_size / med:9.1f} "
            f"{(max(ts) - min(ts)) / med * 100:6.1f}% {speedup(name, ref):7.3f}"
        )
    print(f"(reference: {ref}; x ref: median over rounds of t_ref / t_variant; spread: (max - min) / median)")
    for spec in [s for s in specs if s.real]:
        twin = spec.synthetic_twin()
        print(f"real / synthetic ({spec.name} vs {twin}): {speedup(spec.name, twin):.3f}x the images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

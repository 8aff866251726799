"""Cached vs augmented linear probe on a Fashion-MNIST run: wall time and top-1, side by side in one process.

    python benchmarks/linear_probe_speed.py --run runs/fashion_mnist/simsiam_bf [--epochs 10]

Both probes use the run's frozen backbone, training split and validation split. `cached`: features once, the
learning-rate grid trained together, the head chosen on 10% of the training split (its time includes the feature
extraction). `augmented`: a random crop + flip every epoch (--crop: RandomResizedCrop as MoCo v3 / SimSiam, a
crop of the padded image, or auto = padded below 64 px), one head, SGD, cosine, lr = --base-lr * batch / 256, on
features standardised like the cached probe's (--raw-features: not). Target: cached >= 20x faster than augmented
with top-1 within 1 point. The augmented probe runs --epochs epochs (the papers use 90 at ImageNet scale).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from batchssl.augment import PROBE_CROPS, eval_transform, probe_train_transform
    from batchssl.data import Transformed, eval_datasets
    from batchssl.eval.features import extract_features
    from batchssl.eval.frozen import FrozenSource, load_frozen
    from batchssl.eval.linear_augmented import AugmentedProbeSettings, train_augmented_probe
    from batchssl.eval.linear_cached import CachedProbeSettings, train_cached_probes, train_val_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--epochs", type=int, default=10, help="augmented probe epochs")
    parser.add_argument("--cached-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--base-lr", type=float, default=0.1, help="MoCo v3's linear-probe lr for ResNets")
    parser.add_argument("--raw-features", action="store_true")
    parser.add_argument("--crop", choices=PROBE_CROPS, default="auto")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="config overrides; data.holdout=10000 compares probe settings without the test split",
    )
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()

    frozen = load_frozen(FrozenSource(run=args.run, overrides=args.set))
    train, val = eval_datasets(frozen.cfg.data)
    test_set = Transformed(val, eval_transform(frozen.info))
    print(
        f"run {args.run}: {frozen.cfg.model.arch} width {frozen.cfg.model.width}, train {len(train)}, "
        f"validation {len(val)}; torch threads {torch.get_num_threads()}"
    )

    start = time.perf_counter()
    train_x, train_y = extract_features(
        frozen.backbone, Transformed(train, eval_transform(frozen.info)), batch_size=512, num_workers=args.num_workers
    )
    test_x, test_y = extract_features(frozen.backbone, test_set, batch_size=512, num_workers=args.num_workers)
    features_s = time.perf_counter() - start
    fit, held = train_val_split(train_y, 0.1, 0)
    cached = train_cached_probes(
        train_x[fit],
        train_y[fit],
        train_x[held],
        train_y[held],
        test_x,
        test_y,
        frozen.info.num_classes,
        CachedProbeSettings(epochs=args.cached_epochs),
    )
    cached_s = time.perf_counter() - start

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as ckpt:
        augmented = train_augmented_probe(
            frozen.backbone,
            Transformed(train, probe_train_transform(frozen.info, args.crop)),
            test_set,
            frozen.info.num_classes,
            frozen.feature_dim,
            AugmentedProbeSettings(
                epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr, standardize=not args.raw_features
            ),
            num_workers=args.num_workers,
            checkpoint_dir=ckpt,
        )
    augmented_s = time.perf_counter() - start

    print(f"{'probe':<34} {'seconds':>9} {'top-1':>7}")
    print(
        f"{'cached (' + str(args.cached_epochs) + ' ep, lr grid, features incl.)':<34} {cached_s:>9.1f} "
        f"{cached['test_top1']:>7.2f}   (features {features_s:.1f} s; lr {cached['lr']:g} chosen on held-out train)"
    )
    label = f"augmented ({args.epochs} ep, {args.crop} crop, lr {augmented['lr']:g})"
    print(f"{label:<34} {augmented_s:>9.1f} {augmented['top1']:>7.2f}")
    difference = cached["test_top1"] - augmented["top1"]
    print(
        f"cached is {augmented_s / cached_s:.1f}x faster; top-1 difference {difference:+.2f} points "
        "(targets: >= 20x, within 1 point)"
    )


if __name__ == "__main__":
    sys.exit(main())

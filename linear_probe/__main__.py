"""Linear probe of a frozen backbone: `python -m linear_probe --run runs/x [--mode cached|augmented]`.

cached (default): features computed once (no augmentation), a grid of learning rates trained together, the head
  chosen on a held-out 10% of the training split (never the test split), scored on the validation split.
augmented: the MoCo v3 / SimSiam protocol (RandomResizedCrop + flip every epoch, below 64 px a crop of the
  1/8-padded image instead (--crop), SGD momentum 0.9, wd 0, lr = base * batch / 256, cosine, 90 epochs at
  ImageNet scale; --optimizer lars for SimSiam's 4096 batches); features standardised with statistics fixed
  from 10k training images, as the cached probe's (MAE's BatchNorm before the head; --raw-features for none);
  checkpoints every epoch into <run>/linear_probe_ckpt and resumes from it.
Writes linear_probe.json (one entry per mode). `accelerate launch -m linear_probe ...` runs on several processes.
"""

import argparse
import sys
import time

from batchssl.errors import exit_on_user_error


def main(argv=None) -> None:
    from batchssl.augment import PROBE_CROPS
    from batchssl.cli import add_source_arguments

    parser = argparse.ArgumentParser(
        prog="python -m linear_probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_source_arguments(parser)
    parser.add_argument("--mode", choices=["cached", "augmented"], default="cached")
    parser.add_argument("--epochs", type=int, help="default: 100 cached, 90 augmented")
    parser.add_argument("--batch-size", type=int, help="global batch; default: 1024 cached, 256 augmented")
    parser.add_argument("--base-lr", type=float, default=0.1, help="augmented: lr = base * batch / 256")
    parser.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd", help="augmented mode")
    parser.add_argument(
        "--crop",
        choices=PROBE_CROPS,
        default="auto",
        help="augmented mode: RandomResizedCrop (MoCo v3 / SimSiam), a crop of the padded image, "
        "or auto: resized from 64 px up, padded below",
    )
    parser.add_argument(
        "--raw-features",
        action="store_true",
        help="augmented mode: no feature standardisation (the head sees the backbone's raw output)",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        help="cached mode: the learning-rate grid",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="cached mode: held-out part of train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with exit_on_user_error("linear_probe"):
        run(args)


def check_arguments(args) -> None:
    """Every probe argument checked before any feature is extracted (a bad one must not cost a run's time)."""
    from batchssl.errors import UserError

    checks = [
        (args.epochs is None or args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size is None or args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.base_lr > 0 and args.base_lr != float("inf"), f"--base-lr must be a positive number, got {args.base_lr}"),
        (all(0 < lr < float("inf") for lr in args.lrs), "--lrs must be positive numbers"),
        (0 < args.val_fraction < 1, f"--val-fraction must be in (0, 1), got {args.val_fraction}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run(args) -> dict:
    from batchssl.cli import run_lock, source_from_args
    from batchssl.eval.frozen import resolve
    from batchssl.eval.linear_augmented import AugmentedProbeSettings
    from batchssl.eval.linear_cached import CachedProbeSettings

    source = source_from_args(args)
    _, _, out_dir = resolve(source)  # bad input stops here, before the backbone and the data are loaded
    check_arguments(args)
    if args.mode == "cached":
        settings = CachedProbeSettings(
            lrs=tuple(args.lrs),
            epochs=args.epochs or 100,
            batch_size=args.batch_size or 1024,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    else:
        settings = AugmentedProbeSettings(
            epochs=args.epochs or 90,
            batch_size=args.batch_size or 256,
            base_lr=args.base_lr,
            optimizer=args.optimizer,
            seed=args.seed,
            standardize=not args.raw_features,
        )
    with run_lock(out_dir, source, "python -m linear_probe"):
        return _evaluate(source, settings, args)


def _evaluate(source, settings, args) -> dict:
    from batchssl.augment import probe_train_transform
    from batchssl.cli import record_result, result_key
    from batchssl.data import Transformed, eval_datasets, pretrain_class_counts
    from batchssl.eval.features import extract_features
    from batchssl.eval.frozen import load_frozen
    from batchssl.eval.linear_augmented import train_augmented_probe
    from batchssl.eval.linear_cached import train_cached_probes, train_val_split
    from batchssl.eval.per_class import per_class_report

    frozen = load_frozen(source)
    accelerator, dtype = frozen.accelerator, frozen.dtype
    train_set, test_set = frozen.eval_splits()
    workers = frozen.cfg.data.num_workers
    start = time.perf_counter()
    if args.mode == "cached":
        kwargs = dict(batch_size=512, num_workers=workers, accelerator=accelerator, dtype=dtype, progress=True)
        train_x, train_y = extract_features(frozen.backbone, train_set, desc="train features", **kwargs)
        test_x, test_y = extract_features(frozen.backbone, test_set, desc="test features", **kwargs)
        if not accelerator.is_main_process:
            return {}
        fit, held = train_val_split(train_y, settings.val_fraction, settings.seed)
        result = train_cached_probes(
            train_x[fit],
            train_y[fit],
            train_x[held],
            train_y[held],
            test_x,
            test_y,
            frozen.info.num_classes,
            settings,
            device=accelerator.device,
            progress=True,
            return_predictions=True,
        )
        result["test_labels"] = test_y
    else:
        augmented = Transformed(eval_datasets(frozen.cfg.data)[0], probe_train_transform(frozen.info, args.crop))
        result = train_augmented_probe(
            frozen.backbone,
            augmented,
            test_set,
            frozen.info.num_classes,
            frozen.feature_dim,
            settings,
            accelerator=accelerator,
            checkpoint_dir=frozen.out_dir / "linear_probe_ckpt",
            dtype=dtype,
            num_workers=workers,
            progress=True,
            return_predictions=True,
        )
        if not accelerator.is_main_process:
            return {}
    if args.mode == "cached":  # the same keys for both modes: top1/top5 on the validation split
        result["top1"], result["top5"] = result.pop("test_top1"), result.pop("test_top5")
    # Per-class accuracy, its std, and the many / medium / few means (thirds of the classes by pretraining count).
    result.update(
        per_class_report(
            result.pop("test_predictions"),
            result.pop("test_labels"),
            frozen.info.num_classes,
            pretrain_class_counts(frozen.cfg.data),
        )
    )
    result["seconds"] = time.perf_counter() - start
    path = frozen.out_dir / "linear_probe.json"
    entry = {"mode": args.mode, "dataset": frozen.cfg.data.name, "arch": frozen.cfg.model.arch, **result}
    record = record_result(path, result_key(f"linear {args.mode}", settings, source), entry)
    chosen = (
        f", lr {result['lr']:g} chosen on held-out train (val top-1 {result['val_top1']:.2f})"
        if args.mode == "cached"
        else f", lr {result['lr']:g}"
    )
    groups = ", ".join(f"{g} {result[g]:.2f}" for g in ("many", "medium", "few") if result.get(g) is not None)
    print(f"linear probe ({args.mode}): top-1 {result['top1']:.2f}{chosen}; {result['seconds']:.1f} s")
    print(f"  per class: {groups + ', ' if groups else ''}class std {result['class_std']:.2f}")
    print(f"written {path}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])

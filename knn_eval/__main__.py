"""Weighted kNN of a frozen backbone: `python -m knn_eval --run runs/x [--k 20 200] [--temperature 0.07]`.

The bank is the labelled training split, the queries the validation split of the run's config (the test split,
or the held-out tail of the training split when data.holdout > 0). Writes knn.json beside the weights.
Runs on several processes with `accelerate launch -m knn_eval ...` (features split across them, rank 0 searches).
"""

import argparse
import sys
import time

from batchssl.errors import exit_on_user_error


def main(argv=None) -> None:
    from batchssl.cli import add_source_arguments

    parser = argparse.ArgumentParser(
        prog="python -m knn_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_source_arguments(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbours (one search answers all)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    parser.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch per process")
    args = parser.parse_args(argv)
    with exit_on_user_error("knn_eval"):
        run(args)


def run(args) -> dict:
    from batchssl.cli import run_lock, source_from_args
    from batchssl.eval.frozen import resolve
    from batchssl.eval.knn import KnnSettings

    source = source_from_args(args)
    cfg, _, out_dir = resolve(source)  # bad input stops here, before the backbone and the data are loaded
    settings = KnnSettings(
        ks=tuple(args.k), temperature=args.temperature, batch_size=args.batch_size, num_workers=cfg.data.num_workers
    )
    settings.check()
    with run_lock(out_dir, source, "python -m knn_eval"):
        return _evaluate(source, settings, args)


def _evaluate(source, settings, args) -> dict:
    from batchssl.cli import record_result, result_key
    from batchssl.data import pretrain_class_counts
    from batchssl.eval.frozen import load_frozen
    from batchssl.eval.knn import knn_evaluate_predictions, split_features
    from batchssl.eval.per_class import per_class_report

    frozen = load_frozen(source)
    start = time.perf_counter()
    features = split_features(
        frozen.backbone, *frozen.eval_splits(), settings, frozen.accelerator, frozen.dtype, progress=True
    )
    if not frozen.accelerator.is_main_process:
        return {}
    # One search: top-1/top-5 as knn_evaluate, plus the predictions for the per-class / per-frequency report
    # (many / medium / few: thirds of the classes by how many images of them pretraining saw).
    scores, predictions = knn_evaluate_predictions(features, settings, frozen.info.num_classes)
    class_counts = pretrain_class_counts(frozen.cfg.data)
    for k, v in scores.items():
        v.update(per_class_report(predictions[k], features.query_labels, frozen.info.num_classes, class_counts))
    record = {
        "dataset": frozen.cfg.data.name,
        "arch": frozen.cfg.model.arch,
        "bank": len(features.bank_labels),
        "queries": len(features.query_labels),
        "temperature": args.temperature,
        "seconds": time.perf_counter() - start,
        "results": {str(k): v for k, v in scores.items()},
        "pretrain_class_counts": class_counts,
    }
    record_result(frozen.out_dir / "knn.json", result_key("knn", settings, source), record)
    print(
        f"kNN ({record['dataset']}, {record['arch']}): bank {record['bank']}, queries {record['queries']}, "
        f"T = {args.temperature}"
    )
    print(f"{'k':>6} {'top-1':>7} {'top-5':>7} {'many':>7} {'medium':>7} {'few':>7} {'cls std':>7}")
    for k, v in scores.items():
        groups = " ".join(f"{v[g]:>7.2f}" if v.get(g) is not None else f"{'-':>7}" for g in ("many", "medium", "few"))
        print(f"{k:>6} {v['top1']:>7.2f} {v['top5']:>7.2f} {groups} {v['class_std']:>7.2f}")
    print(f"written {frozen.out_dir / 'knn.json'} ({record['seconds']:.1f} s)")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])

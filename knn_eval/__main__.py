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
    from batchssl.frozen import add_source_arguments

    parser = argparse.ArgumentParser(prog="python -m knn_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbours (one search answers all)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    parser.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch per process")
    args = parser.parse_args(argv)
    with exit_on_user_error("knn_eval"):
        run(args)


def run(args) -> dict:
    from batchssl.augment import eval_transform
    from batchssl.data import Transformed, eval_datasets
    from batchssl.features import extract_features
    from batchssl.frozen import load_frozen, write_json
    from knn_eval.knn import knn_classify

    frozen = load_frozen(args)
    accelerator, dtype = frozen.accelerator, frozen.dtype
    bank, val = eval_datasets(frozen.cfg.data)
    transform = eval_transform(frozen.info)
    start = time.perf_counter()
    kwargs = dict(batch_size=args.batch_size, num_workers=frozen.cfg.data.num_workers, accelerator=accelerator,
                  dtype=dtype, progress=True)
    bank_x, bank_y = extract_features(frozen.backbone, Transformed(bank, transform), desc="bank", **kwargs)
    val_x, val_y = extract_features(frozen.backbone, Transformed(val, transform), desc="queries", **kwargs)
    if not accelerator.is_main_process:
        return {}
    scores = knn_classify(bank_x, bank_y, val_x, val_y, ks=args.k, temperature=args.temperature,
                          num_classes=frozen.info.num_classes)
    record = {"dataset": frozen.cfg.data.name, "arch": frozen.cfg.model.arch, "bank": len(bank_y),
              "queries": len(val_y), "temperature": args.temperature, "seconds": time.perf_counter() - start,
              "results": {str(k): v for k, v in scores.items()}}
    write_json(frozen.out_dir / "knn.json", record)
    print(f"kNN ({record['dataset']}, {record['arch']}): bank {record['bank']}, queries {record['queries']}, "
          f"T = {args.temperature}")
    print(f"{'k':>6} {'top-1':>7} {'top-5':>7}")
    for k, v in scores.items():
        print(f"{k:>6} {v['top1']:>7.2f} {v['top5']:>7.2f}")
    print(f"written {frozen.out_dir / 'knn.json'} ({record['seconds']:.1f} s)")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])

"""Does BatchFormer help SSL on long-tailed data? The study of Fashion-MNIST-LT (ratio 100) in one command.

For every method (SimSiam, SimSiam+BF, MoCo v3, MoCo v3+BF), seed and split: pretrain
`recipes/fashion_mnist/<method>_lt.yaml` (the long-tailed split, 14886 images) and `<method>_lt_balanced.yaml`
(the first 14886 training images, nearly balanced: the same number of images and steps), then score the frozen
backbone on the balanced evaluation splits: `python -m knn_eval` (k = 200, T = 0.07, the recipes' monitor
settings) and the cached linear probe (`python -m linear_probe`). Reported at the final epoch, mean +- sample std
over seeds: top-1, the mean accuracy over the few classes, and the std of the per-class accuracies; then, for each
method with and without BatchFormer on the same split, BF minus plain and Welch's t-test p over the seeds (scipy's
`ttest_ind(equal_var=False)`: the seed variances differ between methods).

"Few" means the same classes in both runs: the last third of the classes by the long-tailed split's counts
(classes 7, 8, 9: 166, 100 and 60 images), so the balanced run shows what those classes reach when pretraining
saw as many of them as of any other (the evaluators' own many / medium / few group by each run's own counts, and a
balanced run has no real tail). Runs that finished are reused (quality.py's rule), so the script can be stopped
and rerun; `--holdout 10000` scores on the held-out tail of the training split instead of the test split (for
trying BatchFormer's options: `--set batchformer.scope=per_view --tag _perview`).

    python benchmarks/long_tail_study.py                           # 4 methods x 3 seeds x {LT, balanced}
    python benchmarks/long_tail_study.py --finished-only           # the table of what has finished, starting nothing
    python benchmarks/long_tail_study.py --methods mocov3 mocov3_bf --seeds 0 --holdout 10000 \\
        --set batchformer.weight=0.5 --tag _w05
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (
    JOB_ENV,
    REPO,
    add_run_arguments,
    bf_effects,
    cached_probe_record,
    linear_probe,
    mean_std,
    prepare_runs,
    pretrain,
    print_bf_effects,
)

METHODS = ["simsiam", "simsiam_bf", "mocov3", "mocov3_bf"]
SPLITS = {"lt": "_lt", "balanced": "_lt_balanced"}
KNN_K, KNN_T = 200, 0.07


def few_classes(lt_counts: list[int]) -> list[int]:
    """The "few" third of the classes by the long-tailed split's counts, grouped as the evaluators group
    (batchssl.eval.per_class.frequency_groups: for C = 10 the three rarest)."""
    from batchssl.eval.per_class import frequency_groups

    return sorted(frequency_groups(lt_counts)["few"])


def scores(per_class: list[float | None], few: list[int]) -> dict:
    """{"few": mean accuracy over `few`, "class_std": population std of the per-class accuracies}."""
    scored = [a for a in per_class if a is not None]
    return {"few": statistics.fmean(per_class[c] for c in few), "class_std": statistics.pstdev(scored)}


def stored_knn(directory: Path) -> dict | None:
    """k = 200, T = 0.07 of the run's knn.json, if `python -m knn_eval` wrote it."""
    path = directory / "knn.json"
    if not path.is_file():
        return None
    from batchssl.report import read_results

    for entry in read_results(path)["entries"].values():
        if entry.get("temperature") == KNN_T and str(KNN_K) in entry.get("results", {}):
            return entry["results"][str(KNN_K)]
    return None


def finished(directory: Path) -> tuple[dict, dict] | None:
    """(kNN record, linear record) of a run whose pretraining and both evaluations are written, else None."""
    if not (directory / "timing.json").is_file():
        return None
    knn, linear = stored_knn(directory), cached_probe_record(directory / "linear_probe.json")
    return (knn, linear) if knn is not None and linear is not None else None


def knn_result(directory: Path) -> dict:
    """k = 200 of `python -m knn_eval` on the run (computed once, then read from knn.json)."""
    if stored_knn(directory) is None:
        with open(directory.parent / f"{directory.name}.log", "a") as log:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "knn_eval",
                    "--run",
                    str(directory),
                    "--k",
                    str(KNN_K),
                    "--temperature",
                    str(KNN_T),
                ],
                cwd=REPO,
                check=True,
                env=JOB_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    return stored_knn(directory)


def linear_result(directory: Path) -> dict:
    linear_probe(directory)  # runs the cached probe unless its result is there
    return cached_probe_record(directory / "linear_probe.json")


def summarise(runs: dict, few: list[int], seeds: dict | None = None) -> list[dict]:
    """runs[(method, split)] = [(knn record, linear record), one per seed] -> rows of per-seed values
    (with the seeds they came from when `seeds[(method, split)]` is given)."""
    rows = []
    for (method, split), per_seed in runs.items():
        row = {"method": method, "split": split}
        if seeds is not None:
            row["seeds"] = seeds[method, split]
        for name, pick in (("knn", 0), ("linear", 1)):
            records = [r[pick] for r in per_seed]
            row[f"{name}_top1"] = [r["top1"] for r in records]
            row[f"{name}_few"] = [scores(r["per_class"], few)["few"] for r in records]
            row[f"{name}_class_std"] = [scores(r["per_class"], few)["class_std"] for r in records]
        rows.append(row)
    return rows


METRICS = ["knn_top1", "knn_few", "knn_class_std", "linear_top1", "linear_few", "linear_class_std"]


SPLIT_LABELS = {"lt": "long-tailed (ratio 100)", "balanced": "balanced, same size"}


def seed_counts(rows: list[dict], split: str) -> str:
    """The legend says how many seeds stand behind the bars of a split, so a bar of one seed (no error bar) reads
    as one."""
    counts = sorted({len(r["knn_top1"]) for r in rows if r["split"] == split})
    return "seeds: " + "/".join(map(str, counts))


def plot(rows: list[dict], path: Path, images: int, splits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, metric, title in ((axes[0], "knn_top1", "kNN top-1"), (axes[1], "knn_few", "kNN, few classes (7-9)")):
        for j, split in enumerate(splits):
            found = [
                (i, r[metric]) for i, m in enumerate(methods) for r in rows if r["method"] == m and r["split"] == split
            ]
            ax.bar(
                [i + 0.38 * j for i, _ in found],
                [statistics.fmean(v) for _, v in found],
                0.38,
                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in found],
                capsize=3,
                label=f"{SPLIT_LABELS[split]} ({seed_counts(rows, split)})",
            )
        ax.set_xticks([i + 0.19 for i in range(len(methods))], methods)
        ax.set_title(title)
        ax.set_ylabel("%")
        low = min(min(r[metric]) for r in rows)
        ax.set_ylim(max(0, low - 10), 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST-LT: pretraining on {images} images, balanced evaluation (mean +- std over the seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=list(SPLITS),
        default=list(SPLITS),
        help="pretraining splits (default both: the study compares them)",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="start nothing: tabulate the runs whose pretraining and evaluations are written "
        "(each row says its seeds), e.g. while other seeds still train",
    )
    add_run_arguments(parser, "long_tail")
    args = parser.parse_args(argv)
    out, overrides = prepare_runs(args)

    def one(job):
        method, split, seed = job
        recipe = method + SPLITS[split]
        directory = out / f"{recipe}{args.tag}_s{seed}"
        pretrain(recipe, seed, directory, overrides)
        return knn_result(directory), linear_result(directory)

    jobs = [(m, s, seed) for seed in args.seeds for m in args.methods for s in args.splits]
    if args.finished_only:
        results = {job: finished(out / f"{job[0]}{SPLITS[job[1]]}{args.tag}_s{job[2]}") for job in jobs}
        missing = [job for job, result in results.items() if result is None]
        if missing:
            print("not finished (left out):", ", ".join(f"{m} {s} seed {seed}" for m, s, seed in missing))
        results = {job: result for job, result in results.items() if result is not None}
    else:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = dict(zip(jobs, pool.map(one, jobs)))
    seeds = {
        (m, s): [seed for seed in args.seeds if (m, s, seed) in results] for m in args.methods for s in args.splits
    }
    seeds = {key: value for key, value in seeds.items() if value}
    if not seeds:
        sys.exit(f"no finished run in {out} for {args.methods} x {args.splits} x seeds {args.seeds}")
    runs = {key: [results[(*key, seed)] for seed in value] for key, value in seeds.items()}
    from batchssl.config import load_config
    from batchssl.data import pretrain_class_counts

    lt_recipe = REPO / "recipes" / "fashion_mnist" / f"{args.methods[0]}_lt.yaml"
    lt_counts = pretrain_class_counts(load_config(lt_recipe, overrides).data)
    few = few_classes(lt_counts)
    rows = summarise(runs, few, seeds)

    split_name = f"held-out last {args.holdout}" if args.holdout else "test split"
    print(
        f"\nFashion-MNIST-LT (ratio 100) vs balanced of the same size; scored on the {split_name}; seeds "
        f"{args.seeds}; few = classes {few}; overrides {overrides or 'none'}"
    )
    print(
        f"{'method':<12} {'split':<9} {'seeds':<7} {'kNN top-1':>14} {'kNN few':>14} {'kNN cls std':>12} "
        f"{'linear top-1':>14} {'linear few':>14}"
    )
    for r in rows:
        print(
            f"{r['method'] + args.tag:<12} {r['split']:<9} {','.join(map(str, r['seeds'])):<7} "
            f"{mean_std(r['knn_top1']):>14} {mean_std(r['knn_few']):>14} {mean_std(r['knn_class_std']):>12} "
            f"{mean_std(r['linear_top1']):>14} {mean_std(r['linear_few']):>14}"
        )
    effects = bf_effects(rows, METRICS, same=("split",))
    print_bf_effects(effects, METRICS, same=("split",))
    (out / f"long_tail{args.tag}.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "bf_vs_plain": effects,
                "few_classes": few,
                "lt_counts": lt_counts,
                "seeds": args.seeds,
                "overrides": overrides,
            },
            indent=1,
        )
    )
    plot(rows, out / f"long_tail{args.tag}.png", sum(lt_counts), args.splits)
    print(f"written {out / f'long_tail{args.tag}.json'} and {out / f'long_tail{args.tag}.png'}")


if __name__ == "__main__":
    main()

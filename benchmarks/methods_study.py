"""Issue 25's study: does BatchFormer help the methods people compare? BatchFormer minus plain for SimSiam, MoCo v3,
BYOL, SimCLR, Barlow Twins, VICReg and DINO on Fashion-MNIST at the default recipe's budget.

It is benchmarks/quality.py over the 14 recipes `recipes/fashion_mnist/<method>{,_bf}.yaml`: per (recipe, seed)
`pretrain.py` then the cached linear probe; final-epoch kNN and linear top-1 as mean +- std over seeds; the floors
(raw pixels, random init); BF minus plain with Welch's p per method; the kNN-over-epochs picture. Its output goes
to benchmarks/out/methods_study/<split>/: quality.json and knn_over_epochs.png (quality.py's), the study's own
table (study.md: per method plain, BF, BF minus plain with Welch's p, for kNN and the linear probe) and picture
(methods_study.png: every seed's final number, plain beside BF, per method), and the run directories. Finished
runs are reused, so the script resumes where it stopped. The full study is 14 recipes x 3 seeds, every run in fp32
(PRECISION below), and each run records the precision and device it trained on; the table's last line says them.
On a 2-core CPU without native bf16, two runs at a time with one thread each took about 40 minutes a pair (about
14 hours in all).

    python benchmarks/methods_study.py                        # test split, seeds 0 1 2
    python benchmarks/methods_study.py --methods byol dino    # a subset (each with its _bf twin)
    python benchmarks/methods_study.py --holdout 10000 --seeds 0

Every other argument goes to quality.py as it is (--seeds, --holdout, --set, --tag, --jobs, --note, --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # quality.py, imported by name as when it runs

METHODS = ["simsiam", "mocov3", "byol", "simclr", "barlowtwins", "vicreg", "dino"]
# Every run in fp32. The recipes ask for bf16, which runs in fp32 on a CPU without native bf16; the study's 42 runs
# take several sessions, on whichever CPU each one gets, and a study whose runs differ in precision would compare
# the precisions too. fp32 is the precision every machine has (the held-out tuning ran in it too).
PRECISION = ["--set", "train.mixed_precision=no"]


def quality_argv(argv: list[str]) -> list[str]:
    """quality.py's arguments for the study: each method's plain recipe beside its _bf twin."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args, rest = parser.parse_known_args(argv)
    recipes = [f"{m}{bf}" for m in args.methods for bf in ("", "_bf")]
    out = [] if "--out" in rest else ["--out", str(REPO / "benchmarks" / "out" / "methods_study")]
    return ["--recipes", *recipes, *out, *PRECISION, *rest]  # a --set of the caller's comes later and wins


def results_path(argv: list[str]) -> Path:
    """The quality.json that quality.py writes for these arguments (its --out, --holdout and --tag)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--holdout", type=int, default=0)
    parser.add_argument("--tag", default="")
    args, _ = parser.parse_known_args(argv)
    return Path(args.out) / (f"holdout{args.holdout}" if args.holdout else "test") / f"quality{args.tag}.json"


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def study_table(results: dict) -> str:
    """The study's Markdown table: per method with both recipes, final-epoch kNN and linear top-1 (mean +- std over
    seeds) plain and with BatchFormer, and BF minus plain with Welch's p (quality.py's `bf_vs_plain`)."""
    rows = {row["recipe"]: row for row in results["rows"]}
    effects = {e["method"]: e for e in results.get("bf_vs_plain", [])}
    lines = [
        "| method | kNN plain | kNN + BF | BF - plain (p) | linear plain | linear + BF | BF - plain (p) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in [m for m in METHODS if m in rows and f"{m}_bf" in rows]:
        cells = [method]
        for metric in ("knn_top1", "linear_top1"):
            plain, with_bf = rows[method][metric], rows[f"{method}_bf"][metric]
            effect = effects.get(method, {}).get(metric)
            diff = f"{effect['difference']:+.2f} (p {effect['welch_p']:.3f})" if effect else "-"
            cells += [_mean_std(plain), _mean_std(with_bf), diff]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = results.get("seeds", [])
    seed_list = ", ".join(map(str, seeds))
    lines.append(f"\n{len(seeds)} seeds ({seed_list}), final epoch; Welch's two-sided p over the seeds.")
    lines.append(machines_line(results["rows"]))
    return "\n".join(lines) + "\n"


def machines_line(rows: list[dict]) -> str:
    """What the runs trained on: one precision for all, or a warning saying which recipes ran in which."""
    runs = [(row["recipe"], p, d) for row in rows for p, d in zip(row.get("precision", []), row.get("device", []))]
    recipes_by_precision: dict[str, set[str]] = {}
    for recipe, precision, _ in runs:
        recipes_by_precision.setdefault(str(precision), set()).add(recipe)
    devices = sorted({str(d) for _, _, d in runs})
    where = f"on {'; '.join(devices)}" if devices else "device not recorded"
    if len(recipes_by_precision) <= 1:
        return f"Every run in {next(iter(recipes_by_precision), 'an unrecorded precision')}, {where}."
    groups = "; ".join(f"{p}: {', '.join(sorted(r))}" for p, r in sorted(recipes_by_precision.items()))
    return f"WARNING: the runs differ in precision ({groups}), {where}."


def plot_study(results: dict, path: Path) -> None:
    """Per method, every seed's final kNN (left) and linear (right) top-1, plain beside BF, with their means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row["recipe"]: row for row in results["rows"]}
    effects = {e["method"]: e for e in results.get("bf_vs_plain", [])}
    methods = [m for m in METHODS if m in rows and f"{m}_bf" in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN top-1 (%)", "linear probe top-1 (%)")):
        for x, method in enumerate(methods):
            for offset, recipe, colour in ((-0.15, method, "tab:gray"), (0.15, f"{method}_bf", "tab:blue")):
                values = rows[recipe][metric]
                ax.scatter([x + offset] * len(values), values, color=colour, s=14)
                ax.hlines(statistics.mean(values), x + offset - 0.1, x + offset + 0.1, color=colour)
        labels = []
        for method in methods:
            effect = effects.get(method, {}).get(metric)
            labels.append(f"{method}\n{effect['difference']:+.2f}, p {effect['welch_p']:.2f}" if effect else method)
        ax.set_xticks(range(len(methods)), labels, fontsize=7)
        ax.set_ylabel(title)
    axes[0].scatter([], [], color="tab:gray", label="plain")
    axes[0].scatter([], [], color="tab:blue", label="+ BatchFormer")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, final epoch: each dot a seed, bars the means; under each method BF - plain, Welch p")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(path: Path) -> None:
    """study.md and methods_study.png beside quality.json."""
    results = json.loads(path.read_text())
    (path.parent / "study.md").write_text(study_table(results))
    plot_study(results, path.parent / "methods_study.png")
    print(study_table(results))
    print(f"written {path.parent / 'study.md'} and {path.parent / 'methods_study.png'}")


def main(argv: list[str] | None = None) -> None:
    import quality

    argv = quality_argv(list(sys.argv[1:] if argv is None else argv))
    quality.main(argv)
    report(results_path(argv))


if __name__ == "__main__":
    main()

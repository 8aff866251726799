"""Representation quality on Fashion-MNIST at the recipes' budget: SimSiam, SimSiam+BF, MoCo v3, MoCo v3+BF.

For every (recipe, seed): `pretrain.py --config recipes/fashion_mnist/<recipe>.yaml seed=S`, then the cached
linear probe (`python -m linear_probe`). Reported at the FINAL epoch (never the best epoch): kNN top-1 of the
monitor (k and T of the recipe; equal to `python -m knn_eval`) and linear-probe top-1, as mean +- std over seeds
(sample std), with the wall time of pretraining. Beside them two floors with the same kNN (bank = the training
images the runs use, queries = their validation split): raw pixels, and the same backbone randomly initialised
(one per seed). For each recipe run beside its `_bf` twin on two seeds or more: BF minus plain and Welch's p.
A PNG plots the monitor's kNN top-1 over epochs (mean over seeds) per recipe; the JSON keeps each run's curve, its
median training images/s (over the log intervals of metrics.jsonl) and the precision and device it really trained
in (timing.json), and `--note` says how the runs were made.

Tuning happens on a held-out part of the training split, never on the test split: `--holdout 10000` adds
`data.holdout=10000` to every run and floor (the last 10000 training images become the validation split).

Runs that already finished are reused (their directory holds `timing.json`), so the script can be stopped and
rerun; `--set key=value` passes overrides to every run (e.g. trying BatchFormer's options) and `--tag` keeps such
variants apart.

    python benchmarks/quality.py                                   # 4 recipes x 3 seeds, test split
    python benchmarks/quality.py --holdout 10000 --seeds 0         # tuning
    python benchmarks/quality.py --recipes simsiam_bf --set batchformer.scope=per_view --tag _perview

`--jobs N` runs N (recipe, seed) pairs at once: for a machine with many cores (a GPU machine whose loaders are
the bottleneck at 28 px). Their pretraining minutes then measure nothing: budgets are the recipes' epochs, sized
for equal time on the 2-core reference machine, run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from batchssl.report import median_images_per_s, read_metrics, read_results

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["simsiam", "simsiam_bf", "mocov3", "mocov3_bf"]


# Each job's threads: its share of the cores (jobs running at once on a CPU would otherwise oversubscribe it, and
# OpenMP threads that lose their core stall at every barrier), unless OMP_NUM_THREADS is set.
JOB_ENV = dict(os.environ)


def run_dir(out: Path, recipe: str, tag: str, seed: int) -> Path:
    return out / f"{recipe}{tag}_s{seed}"


def pretrain(recipe: str, seed: int, directory: Path, overrides: list[str]) -> float:
    """Pretrain unless a finished run is there; returns the pretraining wall time in seconds."""
    timing = directory / "timing.json"
    if timing.is_file():
        return json.loads(timing.read_text())["pretrain_seconds"]
    cmd = [
        sys.executable,
        "pretrain.py",
        "--config",
        f"recipes/fashion_mnist/{recipe}.yaml",
        f"seed={seed}",
        f"output_dir={directory}",
        *overrides,
    ]
    print(f"$ {' '.join(cmd)}", flush=True)  # one string: runs started at once must not interleave it
    start = time.perf_counter()
    with open(directory.parent / f"{directory.name}.log", "w") as log:  # beside the run: its errors, if any
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT, env=JOB_ENV)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"pretrain_seconds": seconds, **machine_record(directory)}))
    return seconds


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def machine_record(directory: Path) -> dict:
    """What a run's numbers depend on beyond its config: the precision it really trained in (bf16 runs in fp32 on a
    CPU without native bf16, and the CPU model varies between machines) and the device. A study whose runs span
    several machines then says so, per run, instead of mixing precisions unseen."""
    import yaml

    from batchssl.cpu import effective_precision

    requested = yaml.safe_load((directory / "config.yaml").read_text())["train"]["mixed_precision"]
    on_cuda = torch.cuda.is_available()  # the run trained on the device this process sees
    precision = effective_precision(requested, on_cpu=not on_cuda)
    device = torch.cuda.get_device_name(0) if on_cuda else cpu_model()
    return {"precision": "fp32" if precision == "no" else precision, "device": device}


def run_record(directory: Path) -> dict:
    """A finished run's timing.json: its seconds and, for runs since the record was added, precision and device."""
    record = json.loads((directory / "timing.json").read_text())
    return {"precision": None, "device": None, **record}


def cached_probe_record(path: Path) -> dict | None:
    """The last cached probe's record in a run's linear_probe.json (entries keyed by settings), if there."""
    if not path.is_file():
        return None
    entries = read_results(path)["entries"]
    cached = [e for e in entries.values() if e.get("mode") == "cached"]
    return cached[-1] if cached else None


def cached_probe_top1(path: Path) -> float | None:
    record = cached_probe_record(path)
    return None if record is None else record["top1"]


def linear_probe(directory: Path) -> float:
    path = directory / "linear_probe.json"
    if cached_probe_top1(path) is None:
        with open(directory.parent / f"{directory.name}.log", "a") as log:  # after the pretraining's output
            subprocess.run(
                [sys.executable, "-m", "linear_probe", "--run", str(directory)],
                cwd=REPO,
                check=True,
                env=JOB_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    return cached_probe_top1(path)


def monitor_curve(metrics: list[dict]) -> list[tuple[int, float]]:
    return [(m["epoch"], m["knn_top1"]) for m in metrics if "knn_top1" in m]


def curve_over_seeds(runs: list[list[tuple[int, float]]]) -> list[tuple[int, list[float]]]:
    """Per monitored epoch, the kNN top-1 of every seed's run (for the printed table and the plot)."""
    epochs = sorted({e for run in runs for e, _ in run})
    return [(e, [v for run in runs for e2, v in run if e2 == e]) for e in epochs]


def floors(recipe: str, seeds: list[int], overrides: list[str]) -> dict:
    """kNN on raw pixels and on randomly initialised backbones, on the bank/queries the runs use."""
    from batchssl.augment import eval_transform
    from batchssl.backbones import build_backbone
    from batchssl.config import load_config
    from batchssl.data import Transformed, dataset_info, eval_datasets
    from batchssl.eval.features import extract_features
    from batchssl.eval.knn import knn_classify

    cfg = load_config(REPO / "recipes" / "fashion_mnist" / f"{recipe}.yaml", overrides)
    info = dataset_info(cfg.data)
    bank, val = eval_datasets(cfg.data)
    transform = eval_transform(info)
    bank, val = Transformed(bank, transform), Transformed(val, transform)

    def knn(bank_x, bank_y, val_x, val_y) -> float:
        return knn_classify(
            bank_x,
            bank_y,
            val_x,
            val_y,
            ks=[cfg.monitor.k],
            temperature=cfg.monitor.temperature,
            num_classes=info.num_classes,
        )[cfg.monitor.k]["top1"]

    pixels = torch.nn.Flatten()
    result = {
        "raw_pixels": knn(
            *extract_features(pixels, bank, batch_size=1024), *extract_features(pixels, val, batch_size=1024)
        )
    }
    random_init = []
    for seed in seeds:
        torch.manual_seed(seed)
        backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
        backbone.to("cuda" if torch.cuda.is_available() else "cpu")
        random_init.append(
            knn(*extract_features(backbone, bank, batch_size=512), *extract_features(backbone, val, batch_size=512))
        )
    result["random_init"] = random_init
    return result


def bf_effects(rows: list[dict], metrics: list[str], same: tuple[str, ...] = ()) -> list[dict]:
    """For each row whose `method` has a `<method>_bf` twin (a row with that method and equal `same` fields), both
    with at least two seeds: per metric, the difference of the means (BF minus plain) and Welch's two-sided p over
    the per-seed values (scipy's `ttest_ind(equal_var=False)`: the seed variances differ between methods)."""
    from scipy.stats import ttest_ind

    by_key = {(r["method"], *(r[f] for f in same)): r for r in rows}
    effects = []
    for (method, *rest), plain in by_key.items():
        with_bf = by_key.get((method + "_bf", *rest))
        if with_bf is None or len(plain[metrics[0]]) < 2 or len(with_bf[metrics[0]]) < 2:
            continue
        effect = {"method": method, **dict(zip(same, rest))}
        for metric in metrics:
            effect[metric] = {
                "difference": statistics.fmean(with_bf[metric]) - statistics.fmean(plain[metric]),
                "welch_p": float(ttest_ind(with_bf[metric], plain[metric], equal_var=False).pvalue),
            }
        effects.append(effect)
    return effects


def print_bf_effects(effects: list[dict], metrics: list[str], same: tuple[str, ...] = ()) -> None:
    if not effects:
        return
    print("\nBatchFormer minus plain, difference of the means (Welch's two-sided p over the seeds)")
    print(f"{'method':<12} " + "".join(f"{f:<9} " for f in same) + " ".join(f"{m:>18}" for m in metrics))
    for e in effects:
        print(
            f"{e['method']:<12} "
            + "".join(f"{e[f]:<9} " for f in same)
            + " ".join(f"{e[m]['difference']:+7.2f} (p {e[m]['welch_p']:.3f})" for m in metrics)
        )


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def plot(curves: dict[str, list[list[tuple[int, float]]]], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        per_epoch = curve_over_seeds(runs)
        ax.plot([e for e, _ in per_epoch], [statistics.mean(v) for _, v in per_epoch], marker="o", label=name)
    ax.axhline(floor["raw_pixels"], color="gray", linestyle="--", label="raw pixels")
    ax.axhline(statistics.mean(floor["random_init"]), color="gray", linestyle=":", label="random init")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("Fashion-MNIST: kNN top-1 over epochs (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_run_arguments(parser: argparse.ArgumentParser, out_name: str) -> None:
    """The options every study of pretraining runs shares (this script and long_tail_study.py)."""
    parser.add_argument("--holdout", type=int, default=0, help="tune on the last N training images, not the test set")
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="key=value",
        help="overrides for every run (may be repeated)",
    )
    parser.add_argument("--tag", default="", help="suffix of the run directories for a variant")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with its share of the cores)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / out_name))


def prepare_runs(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Each job's thread share, the output folder (one per validation split) and the overrides of every run."""
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        JOB_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    out = Path(args.out) / (f"holdout{args.holdout}" if args.holdout else "test")
    out.mkdir(parents=True, exist_ok=True)
    return out, [*args.set] + ([f"data.holdout={args.holdout}"] if args.holdout else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--note", default="", help="stored in the JSON: how the runs were made (e.g. two at once)")
    add_run_arguments(parser, "quality")
    args = parser.parse_args(argv)
    out, overrides = prepare_runs(args)

    def one(pair: tuple[str, int]) -> tuple[float, float]:
        recipe, seed = pair
        directory = run_dir(out, recipe, args.tag, seed)
        seconds = pretrain(recipe, seed, directory, overrides)
        return seconds, linear_probe(directory)

    pairs = [(recipe, seed) for seed in args.seeds for recipe in args.recipes]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on the subprocesses
        results = dict(zip(pairs, pool.map(one, pairs)))
    rows, curves = [], {}
    for recipe in args.recipes:
        knn, probe, minutes, runs, speeds, precisions, devices = [], [], [], [], [], [], []
        for seed in args.seeds:
            seconds, top1 = results[recipe, seed]
            metrics = read_metrics(run_dir(out, recipe, args.tag, seed))
            record = run_record(run_dir(out, recipe, args.tag, seed))
            precisions.append(record["precision"])
            devices.append(record["device"])
            minutes.append(seconds / 60)
            runs.append(monitor_curve(metrics))
            speeds.append(median_images_per_s(metrics))
            knn.append(runs[-1][-1][1])  # final epoch
            probe.append(top1)
        curves[recipe + args.tag] = runs
        # Per seed, in the order of `seeds`: the final numbers, the kNN curve [[epoch, top-1], ...], the speed, and
        # the precision and device it trained on (None: a run finished before they were recorded).
        rows.append(
            {
                "recipe": recipe + args.tag,
                "method": recipe,
                "knn_top1": knn,
                "linear_top1": probe,
                "minutes": minutes,
                "knn_curves": runs,
                "median_images_per_s": speeds,
                "precision": precisions,
                "device": devices,
            }
        )
    floor = floors(args.recipes[0], args.seeds, overrides)

    split = f"held-out last {args.holdout} training images" if args.holdout else "test split"
    print(f"\nFashion-MNIST, validation = {split}; seeds {args.seeds}; overrides {overrides or 'none'}")
    print(f"{'recipe':<22} {'kNN top-1':>16} {'linear top-1':>16} {'pretrain min':>13}")
    for row in rows:
        print(
            f"{row['recipe']:<22} {mean_std(row['knn_top1']):>16} {mean_std(row['linear_top1']):>16} "
            f"{statistics.mean(row['minutes']):>13.1f}"
        )
    print(f"{'floor: raw pixels':<22} {floor['raw_pixels']:>16.2f}")
    print(f"{'floor: random init':<22} {mean_std(floor['random_init']):>16}")
    print("\nkNN top-1 over epochs (mean +- std over seeds)")
    for name, runs in curves.items():
        print(f"{name:<22} " + "; ".join(f"epoch {e}: {mean_std(v)}" for e, v in curve_over_seeds(runs)))
    effects = bf_effects(rows, ["knn_top1", "linear_top1"])
    print_bf_effects(effects, ["knn_top1", "linear_top1"])
    tag = args.tag or ""
    (out / f"quality{tag}.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "bf_vs_plain": effects,
                "floors": floor,
                "overrides": overrides,
                "seeds": args.seeds,
                **({"note": args.note} if args.note else {}),
            },
            indent=1,
        )
    )
    plot(curves, floor, out / f"knn_over_epochs{tag}.png")
    print(f"written {out / f'quality{tag}.json'} and {out / f'knn_over_epochs{tag}.png'}")


if __name__ == "__main__":
    main()

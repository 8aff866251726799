"""Quality parity of the file pipeline: Fashion-MNIST written out as a PNG ImageFolder (and as tar shards), trained
with the default recipe's settings through the split pipeline, against the same recipe on the in-memory arrays.

The folder is the 60000 training images under train/<class>/ and the 10000 test images under val/<class>/, as
28x28 grayscale PNGs (read as RGB: 3 equal channels). Every arm runs `pretrain.py --config
recipes/fashion_mnist/mocov3_bf.yaml seed=S` with the same epochs, batch and optimiser; the file arms add
`data.name=imagefolder data.root=FOLDER data.image_size=28` (or `data.name=shards`). Reported: the monitor's kNN
top-1 at the FINAL epoch on the test split (k and T of the recipe), mean +- std over seeds, the difference of the
file arm from the in-memory arm, Welch's p, and whether the difference lies within the seed spread (the larger of
the two arms' sample standard deviations). Finished runs are reused (benchmarks/quality.py's `timing.json`), so the
script can be stopped and rerun.

    python benchmarks/png_folder_parity.py                      # memory and folder, seeds 0 1
    python benchmarks/png_folder_parity.py --arms memory folder shards --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchssl.config import DataConfig
from batchssl.data import load_split
from batchssl.report import median_images_per_s, read_metrics
from quality import REPO, mean_std, monitor_curve, pretrain, run_dir

RECIPE = "mocov3_bf"


def write_png_folder(root: Path) -> Path:
    """train/ and val/ (the test split) as PNGs named by their index, so ImageFolder's sorted order is the arrays'
    order within a class. Idempotent: a finished folder has DONE."""
    if (root / "DONE").is_file():
        return root
    for split, folder in (("train", "train"), ("test", "val")):
        images = load_split(DataConfig(name="fashion_mnist"), split)
        for c in range(10):
            (root / folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(len(images)):
            image, label = images[i]
            Image.fromarray(np.asarray(image)).save(root / folder / f"class_{label}" / f"{i:05d}.png")
    (root / "DONE").write_text("")
    return root


def write_shards(folder: Path, out: Path) -> Path:
    done = out.parent / f"{out.name}.DONE"  # beside the shard directory, which only the converter writes
    if not done.is_file():
        subprocess.run([sys.executable, "-m", "batchssl.shards", str(folder), str(out)], cwd=REPO, check=True)
        done.write_text("")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["memory", "folder"], choices=["memory", "folder", "shards"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", default=str(REPO / "benchmarks" / "out" / "fashion_mnist_png"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "png_folder_parity"))
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = write_png_folder(Path(args.data))
    overrides = {
        "memory": [],
        "folder": ["data.name=imagefolder", f"data.root={folder}", "data.image_size=28"],
    }
    if "shards" in args.arms:
        shards = write_shards(folder, Path(args.data + "_shards"))
        overrides["shards"] = ["data.name=shards", f"data.root={shards}", "data.image_size=28"]

    rows = {}
    for seed in args.seeds:  # seed-major: a stop leaves comparable pairs
        for arm in args.arms:
            directory = run_dir(out, RECIPE, f"_{arm}", seed)
            seconds = pretrain(RECIPE, seed, directory, [*overrides[arm], *args.set])
            metrics = read_metrics(directory)
            row = rows.setdefault(arm, {"knn_top1": [], "minutes": [], "median_images_per_s": [], "curves": []})
            row["curves"].append(monitor_curve(metrics))
            row["knn_top1"].append(row["curves"][-1][-1][1])
            row["minutes"].append(seconds / 60)
            row["median_images_per_s"].append(median_images_per_s(metrics))

    print(f"\nFashion-MNIST, {RECIPE}, test split, final epoch; seeds {args.seeds}")
    print(f"{'arm':<8} {'kNN top-1':>16} {'minutes':>9} {'images/s':>9}")
    for arm, row in rows.items():
        print(
            f"{arm:<8} {mean_std(row['knn_top1']):>16} {statistics.mean(row['minutes']):>9.1f} "
            f"{statistics.mean(row['median_images_per_s']):>9.0f}"
        )
    comparisons = {}
    if "memory" in rows and len(args.seeds) >= 2:
        from scipy.stats import ttest_ind

        ref = rows["memory"]["knn_top1"]
        for arm in (a for a in rows if a != "memory"):
            values = rows[arm]["knn_top1"]
            difference = statistics.fmean(values) - statistics.fmean(ref)
            spread = max(statistics.stdev(ref), statistics.stdev(values))
            p = float(ttest_ind(values, ref, equal_var=False).pvalue)
            comparisons[arm] = {"difference": difference, "seed_spread": spread, "welch_p": p}
            verdict = "within" if abs(difference) <= spread else "OUTSIDE"
            print(f"{arm} minus memory: {difference:+.2f} (Welch p {p:.3f}); {verdict} the seed spread {spread:.2f}")
    result = {"recipe": RECIPE, "seeds": args.seeds, "set": args.set, "rows": rows, "vs_memory": comparisons}
    (out / "parity.json").write_text(json.dumps(result, indent=1))
    print(f"written {out / 'parity.json'}")


if __name__ == "__main__":
    main()

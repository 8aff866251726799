"""Issue 25's study: does BatchFormer help the methods people compare? BatchFormer minus plain for SimSiam, MoCo v3,
BYOL, SimCLR, Barlow Twins, VICReg and DINO on Fashion-MNIST at the default recipe's budget.

It is benchmarks/quality.py over the 14 recipes `recipes/fashion_mnist/<method>{,_bf}.yaml`: per (recipe, seed)
`pretrain.py` then the cached linear probe; final-epoch kNN and linear top-1 as mean +- std over seeds; the floors
(raw pixels, random init); BF minus plain with Welch's p per method; the kNN-over-epochs picture. Its output goes
to benchmarks/out/methods_study/ (quality.json, the PNG and the run directories). Finished runs are reused, so
the script resumes where it stopped: the full study (14 recipes x 3 seeds, about 10 minutes each on the 2-core
reference machine) takes about 7 hours.

    python benchmarks/methods_study.py                        # test split, seeds 0 1 2
    python benchmarks/methods_study.py --methods byol dino    # a subset (each with its _bf twin)
    python benchmarks/methods_study.py --holdout 10000 --seeds 0

Every other argument goes to quality.py as it is (--seeds, --holdout, --set, --tag, --jobs, --note, --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # quality.py, imported by name as when it runs

METHODS = ["simsiam", "mocov3", "byol", "simclr", "barlowtwins", "vicreg", "dino"]


def quality_argv(argv: list[str]) -> list[str]:
    """quality.py's arguments for the study: each method's plain recipe beside its _bf twin."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args, rest = parser.parse_known_args(argv)
    recipes = [f"{m}{bf}" for m in args.methods for bf in ("", "_bf")]
    out = [] if "--out" in rest else ["--out", str(REPO / "benchmarks" / "out" / "methods_study")]
    return ["--recipes", *recipes, *out, *rest]


def main(argv: list[str] | None = None) -> None:
    import quality

    quality.main(quality_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()

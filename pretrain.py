"""Self-supervised pretraining: `accelerate launch pretrain.py [--config RECIPE] [dotted.key=value ...]`.

Without --config it runs the default recipe (Fashion-MNIST, MoCo v3 + BatchFormer, CPU-sized).
`--plan` prints what the run would do (processes, batches, lr, steps, parameters, a timed estimate) and exits.
"""

import argparse
import sys
from pathlib import Path

from batchssl.errors import exit_on_user_error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (default: recipes/fashion_mnist/mocov3_bf.yaml)")
    parser.add_argument("--plan", action="store_true", help="print the run's derived numbers and a timed estimate")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=5 output_dir=runs/x")
    args = parser.parse_args(argv)
    with exit_on_user_error("pretrain.py"):
        # The config is read and checked before torch is imported, so a bad key is reported at once.
        from batchssl.config import DEFAULT_RECIPE, load_config

        cfg = load_config(args.config or Path(__file__).resolve().parent / DEFAULT_RECIPE, args.overrides)
        from batchssl.cpu import tune_process

        tune_process(cfg)  # threads and malloc for this process, once, before anything is built
        if args.plan:
            from batchssl.plan import print_plan

            print_plan(cfg)
            return
        from batchssl.train import train

        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])

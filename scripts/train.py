#!/usr/bin/env python
"""Train CustomCXRNet and track the run: `python scripts/train.py --config configs/quick.yaml --tracker mlflow`.

--folds k cross-validates (k child runs under one parent, a final model from the folds); --seeds n runs n
seeds and reports the mean +- std of the test metrics (docs/model-quality.md).
"""

from __future__ import annotations

import argparse

from cxrtrack import signals
from cxrtrack.cli import EXIT_RUN_FAILED, add_common_arguments, run_main, setup_logging
from cxrtrack.config import load_config
from cxrtrack.tracking import KILLED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, default_config="configs/default.yaml")
    parser.add_argument("--tracker", help="mlflow | wandb | both | none (default: tracking.tracker in the config)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--run-name")
    parser.add_argument("--folds", type=int, help="k-fold cross-validation on train/ (training.cv_folds; FOLDS= in make)")
    parser.add_argument("--seeds", type=int, help="run n seeds, report mean +- std of the test metrics (SEEDS= in make)")
    args = parser.parse_args()
    setup_logging(args.verbose)

    flags = {"data.path": args.data, "tracking.tracker": args.tracker, "training.epochs": args.epochs,
             "data.batch_size": args.batch_size, "training.lr": args.lr, "data.image_size": args.image_size,
             "run_name": args.run_name, "training.cv_folds": args.folds, "training.seeds": args.seeds}
    cfg = load_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
    # torch and the training stack are imported only once the flags and the config are valid
    from cxrtrack.selection import run

    result = run(cfg)
    if result.status == KILLED:
        return signals.exit_status()  # 130 for Ctrl-C, 143 for SIGTERM
    return 0 if result.complete else EXIT_RUN_FAILED  # a tracker does not hold all of it: the last line says what


if __name__ == "__main__":
    run_main(main)

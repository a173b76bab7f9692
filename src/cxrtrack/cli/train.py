"""Train CustomCXRNet and track the run: `cxrtrack train --config configs/quick.yaml --tracker mlflow`
(or `python scripts/train.py ...`).

--folds k cross-validates (k child runs under one parent, a final model from the folds); --seeds n runs n
seeds and reports the mean +- std of the test metrics (docs/model-quality.md).
--resume <run folder | MLflow run id | W&B run id> continues an interrupted run from its last epoch, in the same
folder and the same tracked runs (docs/user-guide.md).
"""

from __future__ import annotations

import argparse

from cxrtrack import signals
from cxrtrack.cli import EXIT_RUN_FAILED, add_common_arguments, setup_logging
from cxrtrack.config import ConfigError, load_config
from cxrtrack.threads import apply_threads
from cxrtrack.tracking import KILLED, tracker_names


def _threads_flag(value: str | None):
    """--threads as the config takes it: "auto" or an integer (the config says what is wrong with anything else)."""
    return int(value) if value is not None and value.strip().isdigit() else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, default_config="configs/default.yaml")
    parser.add_argument("--tracker", help="mlflow | wandb | both | none (default: tracking.tracker in the config)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--run-name")
    parser.add_argument("--folds", type=int,
                        help="k-fold cross-validation on train/ (training.cv_folds; FOLDS= in make)")
    parser.add_argument("--seeds", type=int,
                        help="run n seeds, report mean +- std of the test metrics (SEEDS= in make)")
    parser.add_argument("--threads", help="CPU threads for torch: auto or a number (threads; THREADS= in make)")
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run: its folder (outputs/<run>), "
                                                        "its MLflow run id or its W&B run id (RESUME= in make)")
    args = parser.parse_args()
    setup_logging(args.verbose)

    flags = {"data.path": args.data, "tracking.tracker": args.tracker, "training.epochs": args.epochs,
             "data.batch_size": args.batch_size, "training.lr": args.lr, "data.image_size": args.image_size,
             "run_name": args.run_name, "training.cv_folds": args.folds, "training.seeds": args.seeds,
             "threads": _threads_flag(args.threads)}
    cfg = load_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
    if args.resume and (args.folds or args.seeds):
        raise ConfigError("--resume continues one interrupted run; it cannot be combined with --folds or --seeds "
                          "(FOLDS=/SEEDS=). Resume without them, or start the cross-validation or seed study again.")
    # a mistyped TRACKER= or DATA= is said in a fraction of a second, not after ~5 s of imports
    tracker_names(cfg["tracking"]["tracker"])
    if cfg["data"].get("path"):
        from cxrtrack.data.layout import locate_dataset

        locate_dataset(cfg["data"]["path"])
    apply_threads(cfg["threads"])  # before torch is imported: OpenMP reads its settings once, when it starts
    # torch, torchvision and the trackers are imported only now, after the flags, the config and the data path
    if args.resume:
        from cxrtrack.training import resume as resuming
        from cxrtrack.training.run import run_experiment

        point = resuming.load(args.resume, cfg["output_dir"])
        cfg = resuming.resume_config(point, args.epochs, args.tracker)
        if args.data:
            cfg["data"]["path"] = args.data
        result = run_experiment(cfg, resume=point)
    else:
        from cxrtrack.selection import run

        result = run(cfg)
    if result.status == KILLED:
        return signals.exit_status()  # 130 for Ctrl-C, 143 for SIGTERM
    return 0 if result.complete else EXIT_RUN_FAILED  # a tracker does not hold all of it: the last line says what

"""Tune CustomCXRNet's hyperparameters with Optuna, tracked in MLflow or W&B (make mlflow-tune / wandb-tune).

  cxrtrack tune --space configs/mlflow/hyperparameters.yaml --config configs/tune/quick.yaml --tracker mlflow
  cxrtrack tune --space configs/wandb/sweep.yaml --config configs/tune/quick.yaml --tracker wandb

Rerunning with the same study name resumes the study. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import logging
import os

from cxrtrack.cli import EXIT_INTERRUPTED, add_common_arguments, setup_logging
from cxrtrack.threads import apply_threads, cpu_count
from cxrtrack.tracking import KILLED
from cxrtrack.tuning.space import BaseConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_config="configs/tune/quick.yaml")
    parser.add_argument("--space", default="configs/mlflow/hyperparameters.yaml",
                        help="search space: this project's format (params:) or a W&B sweep file (parameters:)")
    parser.add_argument("--tracker", default="mlflow", help="mlflow | wandb | both | none (default: mlflow)")
    parser.add_argument("--trials", type=int, help="trial budget (default: trials / run_cap in the space)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    parser.add_argument("--study",
                        help="study name (default: 'name' in the space, else its file name); reuse it to resume")
    parser.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: SQLite "
                                          "optuna.db beside the MLflow store)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (overrides the config)")
    parser.add_argument("--engine", choices=("auto", "optuna", "wandb"), default="auto",
                        help="wandb tracker only: 'wandb' = a W&B-server sweep (needs an API key and network), "
                             "'optuna' = a local sweep, 'auto' = W&B's when it is online (default)")
    parser.add_argument("--sweep-id", help="join an existing W&B-server sweep as one more agent (entity/project/id)")
    args = parser.parse_args()
    setup_logging(args.verbose)

    values = {k: v for k, v in {"data.path": args.data, "training.epochs": args.epochs}.items() if v is not None}
    base = BaseConfig(args.config, list(args.overrides), values)
    threads = base.load()["threads"]
    if args.workers > 1 and threads == "auto":  # N workers x one thread per core each would oversubscribe the CPU
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // args.workers)))
    apply_threads(threads)  # before torch is imported (the workers inherit the environment)
    if args.tracker == "wandb" and args.engine != "optuna":
        from cxrtrack.tuning.wandb_sweep import online_requested, tune_online

        if online_requested(base, args.engine, args.sweep_id):
            if tune_online(args.space, base, sweep_id=args.sweep_id, trials=args.trials,
                           required=args.engine == "wandb"):
                return 0

    from cxrtrack.tuning.study import print_result, tune

    if "wandb" in args.tracker or args.tracker == "both":
        logging.getLogger("tune").warning(
            "LOCAL sweep: Optuna runs this search on this machine (W&B's sweep controller lives on its server, which "
            "is not used here); each trial is an offline W&B run grouped by the study name.")

    result = tune(args.space, base, args.tracker, study=args.study, storage=args.storage, trials=args.trials,
                  workers=args.workers)
    print_result(result, args.tracker, local_sweep="wandb" in args.tracker or args.tracker == "both")
    return EXIT_INTERRUPTED if result.status == KILLED else 0

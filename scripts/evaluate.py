#!/usr/bin/env python
"""Evaluate a trained CustomCXRNet on the test split: a checkpoint file or an MLflow run."""

from __future__ import annotations

import argparse

from cxrtrack.cli import run_main, setup_logging
from cxrtrack.errors import CXRError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a best.pt written by training (outputs/<run>/checkpoints/best.pt)")
    source.add_argument("--run-id", help="an MLflow run id: its checkpoints/best.pt artifact is downloaded")
    parser.add_argument("--tracking-uri", help="MLflow store of --run-id (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--data", help="dataset folder (default: the data the model was trained on)")
    parser.add_argument("--out", help="report folder (default: outputs/eval-<run name> in the current folder)")
    args = parser.parse_args()
    setup_logging()
    if args.run_id:
        from cxrtrack.tracking.mlflow_tracker import download_checkpoint

        checkpoint = download_checkpoint(args.run_id, args.tracking_uri)
    elif args.checkpoint:
        checkpoint = args.checkpoint
    else:
        raise CXRError("Say what to evaluate: CHECKPOINT=outputs/<run>/checkpoints/best.pt or RUN_ID=<mlflow run id> "
                       "(scripts/evaluate.py --checkpoint ... | --run-id ...).")
    # torch, torchvision and scikit-learn are imported only now, after the flags were checked
    from cxrtrack.training.evaluate import evaluate_checkpoint

    report, out = evaluate_checkpoint(checkpoint, args.data, args.out)
    print(report.report)
    print(f"test loss {report.loss:.4f}  acc {report.metrics['acc']:.4f}  macro-F1 {report.metrics['f1_macro']:.4f}  "
          f"ROC-AUC (ovr, macro) {report.metrics['roc_auc_ovr_macro']:.4f}\nReport written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

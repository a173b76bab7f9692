"""Evaluate a trained CustomCXRNet on the test split: a checkpoint, a registered model, a W&B artifact or an MLflow run.

The results go to a report folder and, for a tracked model, back to the MLflow run (and W&B run) that trained it,
keyed by the fingerprint of the evaluated data.
"""

from __future__ import annotations

import argparse

from cxrtrack.cli import setup_logging
from cxrtrack.errors import CXRError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="models:/CustomCXRNet@champion "
                                        "| wandb:<entity>/<project>/customcxrnet:champion "
                                        "| a checkpoint file | an MLflow run id")
    source.add_argument("--checkpoint", help="a best.pt written by training (outputs/<run>/checkpoints/best.pt)")
    source.add_argument("--run-id", help="an MLflow run id: its checkpoints/best.pt artifact is downloaded")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--data", help="dataset folder (default: the data the model was trained on)")
    parser.add_argument("--out", help="report folder (default: outputs/eval-<run name>-<data fingerprint>)")
    parser.add_argument("--no-report-back", action="store_true",
                        help="do not log the results back to the tracked runs that trained the model")
    args = parser.parse_args()
    setup_logging()
    ref = args.model or args.checkpoint or args.run_id
    if not ref:
        raise CXRError("Say what to evaluate: MODEL=models:/CustomCXRNet@champion, "
                       "MODEL=outputs/<run>/checkpoints/best.pt, CHECKPOINT=... or RUN_ID=<mlflow run id> "
                       "(scripts/evaluate.py --model ... | --checkpoint ... | --run-id ...).")
    from cxrtrack.tracking.fetch import kind_of

    # what the flag says, else what the reference looks like (an unknown kind fails here, before torch is imported)
    kind = "checkpoint" if args.checkpoint else "mlflow-run" if args.run_id else kind_of(ref)
    from cxrtrack.tracking.fetch import resolve

    checkpoint, origin = resolve(ref, args.tracking_uri, kind)
    # torch, torchvision and scikit-learn are imported only now, after the flags were checked and the model found
    from cxrtrack.training.report_back import evaluate_and_report

    report, out, told = evaluate_and_report(checkpoint, origin, args.data, args.out, args.tracking_uri,
                                            report_back=not args.no_report_back)
    print(report.report)
    print(f"test loss {report.loss:.4f}  acc {report.metrics['acc']:.4f}  macro-F1 {report.metrics['f1_macro']:.4f}  "
          f"ROC-AUC (ovr, macro) {report.metrics['roc_auc_ovr_macro']:.4f}\nReport written to {out}")
    for line in told:
        print(line)
    return 0

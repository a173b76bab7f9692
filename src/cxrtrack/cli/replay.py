"""Send the tracker calls spooled during an outage (outputs/<run>/spool/) to their store, in order, and close
the MLflow runs that a killed process left RUNNING. Safe to run again: what was sent is never sent twice."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrtrack.cli import EXIT_RUN_FAILED, setup_logging
from cxrtrack.config import load_config
from cxrtrack.provenance import redact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.yaml", help="config naming output_dir and the MLflow store")
    parser.add_argument("--outputs", help="folder of the runs (default: output_dir of the config)")
    parser.add_argument("--tracking-uri", help="send to this MLflow store instead of the one each spool recorded "
                                               "(a server that moved); also searched for killed runs")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config)
    # torch and MLflow are imported only now, after the flags and the config were checked
    from cxrtrack.tracking.mlflow_tracker import resolve_tracking_uri
    from cxrtrack.tracking.replay import replay_all

    outputs = Path(args.outputs or cfg["output_dir"])
    uri = resolve_tracking_uri(args.tracking_uri or cfg["tracking"]["mlflow"]["tracking_uri"])
    report = replay_all(outputs, [uri], tracking_uri_override=args.tracking_uri)
    for result in report.spools:
        print(f"{result.spool}: {result.run}: {result.status}")
    for run_id, name, action in report.orphans:
        print(f"MLflow run {name} ({run_id}), left RUNNING by a process that is gone: {action}")
    sent = sum(r.sent for r in report.spools)
    print(f"{len(report.spools)} spool(s) under {outputs}, {sent} call(s) sent; {len(report.orphans)} run(s) of killed "
          f"processes handled in {redact(uri)}{' and the spools stores' if report.spools else ''}.")
    return 0 if report.ok else EXIT_RUN_FAILED

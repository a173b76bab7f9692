"""Send the tracker calls spooled during an outage (outputs/<run>/spool/) to the MLflow store you configured, in
order, and close the MLflow runs that a killed process left RUNNING. Safe to run again: what was sent is never sent
twice. A spool is data on disk: it is sent only to the configured store (a spool that records another store is
refused, and kept, unless --to-recorded-uri), and only the files inside its own folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrtrack.cli import EXIT_RUN_FAILED, EXIT_USER_ERROR, paragraph, setup_logging
from cxrtrack.config import load_config
from cxrtrack.errors import CXRError
from cxrtrack.provenance import redact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.yaml",
                        help="config naming output_dir and the MLflow store")
    parser.add_argument("--outputs", help="folder of the runs (default: output_dir of the config)")
    parser.add_argument("--tracking-uri", help="the MLflow store to send to (make replay MLFLOW_URI=...), instead of "
                                               "the configured one; every spool goes there, whatever store it records "
                                               "(a server that moved); also searched for killed runs")
    parser.add_argument("--to-recorded-uri", action="store_true",
                        help="send a spool that records another store than the configured one to the store it records "
                             "(make replay TO_RECORDED_URI=1); without it such a spool is refused and kept")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config)
    outputs = Path(args.outputs or cfg["output_dir"])
    if args.outputs and not outputs.is_dir():
        problem = "is not a folder" if outputs.exists() else "does not exist"
        raise CXRError(
            f"The folder {outputs} (--outputs, make replay OUTPUTS=...) {problem}, "
            f"so there is no spool to replay there and nothing was done. Name the folder your runs were written to "
            f"(output_dir of the config, outputs/ by default): `make replay OUTPUTS=<folder>`.")
    # MLflow is imported only now, after the flags, the config and the folder were checked
    from cxrtrack.tracking.mlflow_store import resolve_tracking_uri, uri_source
    from cxrtrack.tracking.replay import Destination, replay_all

    mlflow_cfg = cfg["tracking"]["mlflow"]
    configured = args.tracking_uri or mlflow_cfg.get("tracking_uri")
    source = "--tracking-uri (make replay MLFLOW_URI=...)" if args.tracking_uri else uri_source(configured)
    destination = Destination(resolve_tracking_uri(configured), source, override=bool(args.tracking_uri),
                              to_recorded=args.to_recorded_uri)
    where = redact(destination.configured)
    print(f"Replay sends to {where} (named by {source})"
          + ("; every spool goes there, whatever store it records." if destination.override else
             "; a spool that records another store goes to that store (--to-recorded-uri)." if destination.to_recorded
             else "; a spool that records another store is not sent."), flush=True)

    report = replay_all(outputs, destination, http=mlflow_cfg)
    for result in report.spools:
        print(f"{result.spool}: {result.run}: {result.status}")
    for run_id, name, action in report.orphans:
        print(f"MLflow run {name} ({run_id}), left RUNNING by a process that is gone: {action}")
    sent = sum(r.sent for r in report.spools)
    searched = ", ".join(redact(u) for u in report.searched) or "no store"
    unreachable = "".join(f"; {redact(u)} did not answer, so it was not searched" for u in report.unreachable)
    print(f"{len(report.spools)} spool(s) under {outputs}, {sent} call(s) sent; {len(report.orphans)} run(s) of killed "
          f"processes handled in {searched}{unreachable}.")

    refused = report.refused_store
    if refused:
        spools = "; ".join(f"{r.spool} records {redact(str(r.recorded))}" for r in refused)
        print(paragraph(
            f"Not sent: {len(refused)} spool(s) record a store other than the configured one, {where} (named by "
            f"{source}): {spools}. Replay sends only to the store you configured, so nothing of them was sent and "
            f"each stays as it is. If the store a spool records is the right one, send each spool to the store it "
            f"records with `make replay TO_RECORDED_URI=1` (--to-recorded-uri), or configure it (MLFLOW_TRACKING_URI); "
            f"if the server moved, name its new address: `make replay MLFLOW_URI=<uri>` (--tracking-uri)."),
            file=sys.stderr)
    bad_files = [r for r in report.spools if r.refused == "files"]
    if bad_files:
        print(paragraph(
            f"Refused: {len(bad_files)} spool(s) name a file outside their own folder, or a call replay does not know: "
            f"{'; '.join(str(r.spool) for r in bad_files)} (the reason is on its line above). Replay sends only the "
            f"copies a spool keeps inside its own folder, so nothing of them was sent and each stays as it is. A spool "
            f"written by cxrtrack never names anything else: check where it came from, and delete it if it is not "
            f"yours."), file=sys.stderr)
    if not report.ok and len(refused) < sum(r.error is not None for r in report.spools):
        return EXIT_RUN_FAILED
    return EXIT_USER_ERROR if refused else 0


"""Start the MLflow UI on the project's store (`make mlflow-ui`): check the port first, print the latest run's page."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from cxrtrack.errors import CXRError


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def latest_run(uri: str) -> tuple[str, str, str] | None:
    """(experiment id, run id, run name) of the most recently started top-level run in the store (a study's or a
    cross-validation's parent, not its last trial or fold), or None."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = (client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=200)
            if experiments else [])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags] or runs[:1]
    return (top[0].info.experiment_id, top[0].info.run_id, top[0].info.run_name) if top else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uri", required=True, help="backend store URI (sqlite:///...)")
    parser.add_argument("--port", default="5000")
    args = parser.parse_args()
    try:
        port = int(args.port)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise CXRError(f"PORT={args.port!r} is not a port number; pass one from 1 to 65535, "
                       "e.g. make mlflow-ui PORT=5001.") from None
    if args.uri.startswith(("http://", "https://")):
        from cxrtrack.provenance import redact

        print(f"Runs go to the tracking server {redact(args.uri)}: open it in your browser.")
        return 0
    if port_in_use(port):
        raise CXRError(f"Port {port} on 127.0.0.1 is already in use (another MLflow UI or another program): "
                       f"pick a free one with make mlflow-ui PORT={port + 1}, or stop what is listening on {port}.")
    from cxrtrack.tracking.mlflow_tracker import curves_url, run_url, sqlite_path

    db = sqlite_path(args.uri)
    if db is not None and db.exists():
        latest = latest_run(args.uri)
        if latest:
            print(f"Latest run {latest[2]}: {run_url(args.uri, latest[0], latest[1], port)}\n"
                  f"Its experiment's train/val curves: {curves_url(args.uri, latest[0], port)}")
    from cxrtrack.tracking.mlflow_ui_app import APP_NAME, installed

    app = ["--app-name", APP_NAME] if installed() else []
    if not app:  # an install from before the app existed: MLflow's own app, whose UI defaults to GenAI
        print("note: this install does not register the cxrtrack-ui app (run make install again); the UI may open in "
              "GenAI mode: switch it to 'Model training' at the top left once, the browser remembers it.")
    mode = "; opens in Model-training mode" if app else ""
    print(f"MLflow UI: http://127.0.0.1:{port}  (store: {args.uri}{mode}; Ctrl-C to stop)", flush=True)
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # no background job runners: MLflow 3 starts six Huey consumer processes (~2.8 CPU s and ~240 MB each) for GenAI
    # jobs (scorers, evaluations) that model training never uses; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns them on
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [str(mlflow_exe) if mlflow_exe.exists() else "mlflow", "ui", "--backend-store-uri", args.uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *app]
    os.execv(command[0], command) if mlflow_exe.exists() else os.execvp(command[0], command)
    return 0

"""The MLflow store, apart from the tracker: where it is, how to reach it, what it holds that no run of this
process owns, and where the UI shows it.

- Where: ``tracking.mlflow.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///<cwd>/mlflow.db`` (:func:`resolve_tracking_uri`; MLflow's own default, set explicitly: a stray
  ``./mlruns`` folder would otherwise switch MLflow back to the deprecated file store), and which setting said so
  (:func:`uri_source`, for messages).
- Credentials in the URI (``http://user:pass@host``) go to MLflow through its ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` variables (:func:`split_credentials`), so the URI it prints and records has none.
- Reaching it: bounded HTTP timeouts and retries through MLflow's own variables (:func:`apply_http_settings`), and
  :func:`ping`, one probe that answers in seconds.
- Runs no live process owns: each run is tagged with its host, process id and start time
  (:func:`process_identity`), so a run left RUNNING by a killed process is found and closed (:func:`close_orphans`,
  :func:`close_run`); :func:`download_checkpoint` fetches a finished run's checkpoint.
- The UI: the run page and the experiment's train/val chart view (:func:`run_url`, :func:`curves_url`) and the
  experiment tags that make MLflow 3's UI open on them (:data:`EXPERIMENT_TAGS`).

The client library is imported inside the functions that use it, so ``--tracker none`` and the command-line
tools that only resolve a URI never pay for importing MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cxrtrack.tracking.base import KILLED

log = logging.getLogger(__name__)

PING_TIMEOUT = 3.0  # seconds: a server that does not answer /health in this time is reported at once
# Tags that identify the process that owns a run: a run left RUNNING by a process that is gone was killed.
HOST_TAG, PID_TAG, START_TAG = "cxrtrack.host", "cxrtrack.pid", "cxrtrack.process_start"
# The experiment's kind as MLflow's own "experiment type" setting writes it. MLflow 3.17's UI no longer chooses its
# GenAI / Model-training mode from it (a per-browser setting does: see cxrtrack/tracking/mlflow_ui_app.py); kept for the
# MLflow versions and tools that read it.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_PORT = 5000  # `make mlflow-ui` (PORT=... to change)
# The experiment's Chart view opened on train and val of each quantity overlaid in one chart: MLflow's own "shared
# view" (an experiment tag mlflow.sharedViewState.<key> holding the page's state as JSON, opened with
# ?viewStateShareKey=<key>). The run page draws one metric per chart and keeps its layout in the browser only.
CURVES_VIEW = "cxrtrack-curves-v1"


def _line_chart(uuid: str, title: str, keys: list[str]) -> dict[str, Any]:
    return {"uuid": uuid, "type": "LINE", "runsCountToCompare": 10, "metricSectionId": "cxrtrack-curves",
            "deleted": False, "isGenerated": False, "displayName": title, "metricKey": keys[0],
            "selectedMetricKeys": keys, "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
            "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}


def curves_view_state() -> str:
    charts = [_line_chart("cxrtrack-loss", "loss: train (solid), val (dashed)", ["train/loss", "val/loss"]),
              _line_chart("cxrtrack-acc", "accuracy: train (solid), val (dashed)", ["train/acc", "val/acc"]),
              _line_chart("cxrtrack-f1", "macro-F1: train (solid), val (dashed)", ["train/f1_macro", "val/f1_macro"]),
              _line_chart("cxrtrack-lr", "learning rate (log10)", ["log10_lr"])]
    section = {"uuid": "cxrtrack-curves", "name": "Training curves (train and val overlaid)", "display": True,
               "isReordered": True}
    return json.dumps({"compareRunCharts": charts, "isAccordionReordered": True, "compareRunSections": [section]})


def curves_url(tracking_uri: str, experiment_id: str | None, port: int = UI_PORT) -> str:
    base = tracking_uri.rstrip("/") if is_http(tracking_uri) else f"http://127.0.0.1:{port}"
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
            f"&viewStateShareKey={CURVES_VIEW}")


EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
                   "mlflow.note.content": "CustomCXRNet chest X-ray classifier (cxrtrack): one run per training; "
                                          "registered versions in Models > CustomCXRNet "
                                          "(aliases champion, latest-<source>).",
                   f"mlflow.sharedViewState.{CURVES_VIEW}": curves_view_state()}


def run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None, port: int = UI_PORT) -> str:
    """The run page in the MLflow UI: the server itself for an http store, else `make mlflow-ui`'s address.

    ``workflowType=machine_learning``: MLflow 3.17's UI keeps a per-browser GenAI / Model-training setting (default
    GenAI; ``make mlflow-ui`` seeds Model training, see mlflow_ui_app.py); this query parameter opens the page in
    Model training mode (runs, metrics, models) in any browser, whatever the setting says."""
    base = tracking_uri.rstrip("/") if is_http(tracking_uri) else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def resolve_tracking_uri(configured: str | None) -> str:
    # workaround(mlflow): the SQLite URI is set explicitly; a stray ./mlruns would switch to the deprecated file store
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def uri_source(configured: str | None) -> str:
    """Which setting named the tracking URI, for error messages."""
    if configured:
        return "tracking.mlflow.tracking_uri in the config"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "the MLFLOW_TRACKING_URI environment variable"
    return "the default (./mlflow.db)"


def split_credentials(uri: str) -> str:
    """``http://user:pass@host`` -> ``http://host``, handing user and password to MLflow through its own
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables (MLflow then never prints or stores them)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def apply_http_settings(cfg: dict[str, Any]) -> None:
    """Bounded HTTP timeouts and retries through MLflow's own variables, unless the user set them.

    MLflow's defaults (7 retries, backoff factor 2 capped at 120 s, 120 s timeout) stall each call about
    4 minutes against a dead server; these give seconds. They are read by MLflow at every request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.get("http_timeout") or 5)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(cfg.get("http_retries", 2))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # urllib3: 0 s, then 2 s, 4 s, ...


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def process_identity() -> dict[str, str]:
    import psutil

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            START_TAG: f"{psutil.Process().create_time():.2f}"}


def process_alive(tags: dict[str, str]) -> bool | None:
    """Is the process that owns a run (by its tags) still running? None: it ran on another host (unknown)."""
    import psutil

    if tags.get(HOST_TAG) != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(tags[PID_TAG]))
        return abs(proc.create_time() - float(tags.get(START_TAG, 0))) < 1.0  # the pid was not reused
    except (psutil.NoSuchProcess, ValueError, KeyError):
        return False
    except psutil.Error:
        return None

def ping(tracking_uri: str, timeout: float = PING_TIMEOUT) -> bool:
    """Does the store answer? For a server: a healthy answer (2xx) to ``/health`` within ``timeout`` (one try, no
    retries; MLflow's auth leaves ``/health`` open). A proxy's 502/503 in front of a dead server is not an answer:
    counting it as one made every reconnect pay the client's retries. For SQLite: can a write transaction start
    within 0.5 s (MLflow itself waits 20 s on a locked database, ``PRAGMA busy_timeout = 20000``, so probing through
    it would stall every attempt)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        import sqlite3

        try:
            con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=0.5)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.rollback()
            finally:
                con.close()
            return True
        except sqlite3.Error:
            return False
    if not is_http(tracking_uri):
        return True
    import requests

    try:
        return requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout).ok
    except requests.RequestException:
        return False


def close_run(tracking_uri: str, run_id: str, status: str) -> bool:
    """End a run left RUNNING by a process that died (killed hard, machine lost) with ``status``.

    Returns True if the run was still RUNNING and has now been closed; a finished run is left alone.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def download_checkpoint(run_id: str, tracking_uri: str | None = None, dest: str | Path | None = None) -> Path:
    """Fetch ``checkpoints/best.pt`` of an MLflow run (for ``make evaluate RUN_ID=...``)."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from cxrtrack.errors import CXRError

    uri = resolve_tracking_uri(tracking_uri)
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoints/best.pt", tracking_uri=uri,
            dst_path=str(dest or tempfile.mkdtemp(prefix="cxrtrack-")),
        )
    except (MlflowException, OSError) as exc:
        raise CXRError(
            f"Could not fetch checkpoints/best.pt of MLflow run {run_id} from {uri} ({exc}). Check the run id in "
            f"`make mlflow-ui` (a run killed before its first epoch has no checkpoint), and that the store is right "
            f"(MLFLOW_TRACKING_URI or --tracking-uri)."
        ) from None
    return Path(path)


_orphans_checked: set[tuple[str, tuple[str, ...]]] = set()


def _spool_of(run_id: str, tag: str | None) -> Path | None:
    """The spool folder a run's tag names, if that folder's spool.json says it belongs to this very run (a tag is
    data in the store: it must not make replay send some other folder)."""
    if not tag or not Path(tag).is_dir():
        return None
    from cxrtrack.tracking.spool import Spool, SpoolError

    try:
        ref = Spool(Path(tag)).meta().get("ref")
    except SpoolError:
        return None
    return Path(tag) if isinstance(ref, dict) and ref.get("run_id") == run_id else None


def _holds_calls(spool: Path) -> bool:
    from cxrtrack.tracking.spool import Spool, SpoolError

    try:
        return bool(Spool(spool).pending())
    except SpoolError:
        return True  # unreadable: what it holds is not known, so it is not given up


def close_orphans(tracking_uri: str, experiment_ids: list[str] | None, *, once: bool = False,
                  replay=None, closed_by: str = "a later run") -> list[tuple[str, str, str]]:
    """Find runs left RUNNING by a process of this project that is gone (killed with SIGKILL, the machine lost
    power) and end them KILLED, saying so (the tag ``cxrtrack.closed_by`` starts with ``closed_by``: "a later run",
    or "make replay"). A run whose spool still holds calls is replayed instead, when ``replay`` (a function of the
    spool folder) is given, and left for `make replay` otherwise (also when that replay did not send everything).

    Returns (run id, run name, what was done) for each run it acted on or left. ``once``: at most once per
    store and experiments in this process (every run start calls it). ``experiment_ids`` None: every experiment
    of the store (a run killed in one experiment is closed by the next run in any other)."""
    key = (tracking_uri, tuple(experiment_ids or ()))
    if once and key in _orphans_checked:
        return []
    _orphans_checked.add(key)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    done: list[tuple[str, str, str]] = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000):
        tags, name, run_id = run.data.tags, run.info.run_name, run.info.run_id
        if PID_TAG not in tags or process_alive(tags) is not False:
            continue  # not ours, still running, or on another machine (cannot tell)
        from cxrtrack.tracking.spool import SPOOL_TAG

        spool = _spool_of(run_id, tags.get(SPOOL_TAG))
        if spool and replay is not None:
            done.append((run_id, name, replay(spool)))
            if client.get_run(run_id).info.status != "RUNNING" or _holds_calls(spool):
                continue  # closed by its replay, or its calls still wait (refused, or the store failed): left RUNNING
        elif spool and Path(spool, "journal.jsonl").is_file():
            if _holds_calls(spool):
                log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone; its spool %s still "
                            "holds calls: `make replay` sends them and closes the run.",
                            name, run_id, tags[PID_TAG], spool)
                done.append((run_id, name, f"left for `make replay` (spool {spool})"))
                continue
        client.set_tag(run_id, "cxrtrack.closed_by", f"{closed_by}: process {tags[PID_TAG]} on {tags[HOST_TAG]} was "
                                                     f"gone at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_terminated(run_id, KILLED)
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone (killed?): marked KILLED.",
                    name, run_id, tags[PID_TAG])
        done.append((run_id, name, "marked KILLED"))
    return done

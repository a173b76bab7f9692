"""MLflow backend: SQLite store in the project, system metrics, artifacts, model registry.

Store: ``tracking.mlflow.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (MLflow's own default, set explicitly: a stray ``./mlruns`` folder
would otherwise switch MLflow back to the deprecated file store). Artifacts of a new experiment go
to ``<cwd>/mlartifacts`` unless ``tracking.mlflow.artifact_location`` says otherwise. A tracking
server works the same way: ``MLFLOW_TRACKING_URI=http://host:5000``.

Usage telemetry is disabled (``MLFLOW_DISABLE_TELEMETRY``, set in ``cxrtrack.tracking`` before MLflow
is first imported) unless the user has set it.

Reliability: a server is given bounded HTTP timeouts and retries through MLflow's own settings
(``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``_MAX_RETRIES`` / ``_BACKOFF_FACTOR``, from ``tracking.mlflow.http_*``
unless already set), answered-or-not is checked in seconds before a run starts, a fresh SQLite store is
created under an inter-process file lock (concurrent first runs would race MLflow's schema migration),
and credentials in the URI (``http://user:pass@host``) are handed to MLflow through its
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables, so the URI it prints and records
has none. Each run is tagged with its host, process id and start time, so that a run left RUNNING by a
killed process can be found and closed (:func:`close_orphans`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from cxrtrack.config import flatten
from cxrtrack.errors import TrackerError
from cxrtrack.provenance import redact
from cxrtrack.tracking.base import FINISHED, KILLED, BaseTracker, Predictions, RunInfo

log = logging.getLogger(__name__)

# workaround(mlflow): a param value over 6,000 characters is rejected; longer values are cut
_MAX_PARAM_VALUE = 6000  # MLflow's limit for one param value (characters)
PING_TIMEOUT = 3.0  # seconds: a server that does not answer /health in this time is reported at once
# Tags that identify the process that owns a run: a run left RUNNING by a process that is gone was killed.
HOST_TAG, PID_TAG, START_TAG = "cxrtrack.host", "cxrtrack.pid", "cxrtrack.process_start"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, prompts); "custom_model_development"
# (the value its own "experiment type" switch writes) opens it on the runs table and the training charts.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_PORT = 5000  # `make mlflow-ui` (PORT=... to change)
# The experiment's Chart view opened on train and val of each quantity overlaid in one chart: MLflow's own "shared
# view" (an experiment tag mlflow.sharedViewState.<key> holding the page's state as JSON, opened with
# ?viewStateShareKey=<key>). The run page draws one metric per chart and keeps its layout in the browser only.
CURVES_VIEW = "cxrtrack-curves-v1"


def _line_chart(uuid: str, title: str, keys: list[str]) -> dict[str, Any]:
    return {"uuid": uuid, "type": "LINE", "runsCountToCompare": 10, "metricSectionId": "cxrtrack-curves",
            "deleted": False, "isGenerated": False, "displayName": title, "metricKey": keys[0], "selectedMetricKeys": keys,
            "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "range": {}, "xAxisKey": "step",
            "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
            "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}


def curves_view_state() -> str:
    charts = [_line_chart("cxrtrack-loss", "loss: train (solid), val (dashed)", ["train/loss", "val/loss"]),
              _line_chart("cxrtrack-acc", "accuracy: train (solid), val (dashed)", ["train/acc", "val/acc"]),
              _line_chart("cxrtrack-f1", "macro-F1: train (solid), val (dashed)", ["train/f1_macro", "val/f1_macro"]),
              _line_chart("cxrtrack-lr", "learning rate (log10)", ["log10_lr"])]
    return json.dumps({"compareRunCharts": charts, "isAccordionReordered": True,
                       "compareRunSections": [{"uuid": "cxrtrack-curves", "name": "Training curves (train and val overlaid)",
                                               "display": True, "isReordered": True}]})


def curves_url(tracking_uri: str, experiment_id: str | None, port: int = UI_PORT) -> str:
    base = tracking_uri.rstrip("/") if is_http(tracking_uri) else f"http://127.0.0.1:{port}"
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
            f"&viewStateShareKey={CURVES_VIEW}")


EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
                   "mlflow.note.content": "CustomCXRNet chest X-ray classifier (cxrtrack): one run per training; "
                                          "registered versions in Models > CustomCXRNet (aliases champion, latest-<source>).",
                   f"mlflow.sharedViewState.{CURVES_VIEW}": curves_view_state()}


def run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None, port: int = UI_PORT) -> str:
    """The run page in the MLflow UI: the server itself for an http store, else `make mlflow-ui`'s address.

    ``workflowType=machine_learning``: MLflow 3.17's UI keeps a global GenAI / Model-training switch (default GenAI)
    that wins over the experiment's ``mlflow.experimentKind`` tag; this query parameter opens the page in Model
    training mode (runs, metrics, models) whatever the switch says."""
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


def _process_identity() -> dict[str, str]:
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


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


class MLflowTracker(BaseTracker):
    name = "mlflow"

    def __init__(self, experiment: str, cfg: dict[str, Any]):
        self.experiment = experiment
        self.cfg = cfg
        self.uri_source = uri_source(cfg.get("tracking_uri"))
        self.tracking_uri = split_credentials(resolve_tracking_uri(cfg.get("tracking_uri")))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_uri: str | None = None
        self.registered: dict[str, Any] | None = None  # name, version, aliases of the version this run registered
        # Asynchronous logging: metric and param calls are queued and written by MLflow's own thread,
        # so a slow store never holds up a training step; end_run waits for the queue.
        self._sync = not cfg.get("async_logging", False)
        self._mlflow = None

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self):
        apply_http_settings(self.cfg)
        import mlflow

        from cxrtrack.provenance import RedactingFilter

        # MLflow's own INFO lines (database set-up, system-metrics monitor start/stop) say nothing a user acts on:
        # warnings and errors only, unless -v asked for debug logging. The project logs what matters in its format.
        if logging.getLogger().level > logging.DEBUG and logging.getLogger("mlflow").level in (logging.NOTSET, logging.INFO):
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        # MLflow logs through its own handler, not the project's: redact its records too (a URL, a secret value).
        for handler in logging.getLogger("mlflow").handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
        self._mlflow = mlflow

    def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        """Does the store answer? For a server: any HTTP answer to ``/health`` within ``timeout`` (one try, no
        retries). For SQLite: can a write transaction start within 0.5 s (MLflow itself waits 20 s on a locked
        database, ``PRAGMA busy_timeout = 20000``, so probing through it would stall every attempt)."""
        db = sqlite_path(self.tracking_uri)
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
        if not is_http(self.tracking_uri):
            return True
        import requests

        try:
            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout)
            return True
        except requests.RequestException:
            return False

    def _check_reachable(self) -> None:
        if is_http(self.tracking_uri) and not self.ping():
            raise TrackerError(
                f"The MLflow tracking server {redact(self.tracking_uri)} (named by {self.uri_source}) does not answer "
                f"within {PING_TIMEOUT:g} s. Nothing was trained. Start the server, correct {self.uri_source}, or "
                f"run with --tracker none (or TRACKER=none) to train without it."
            )

    def start_run(self, run: RunInfo):
        mlflow = self._mlflow
        self._check_reachable()
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id = self._experiment_id()
        try:
            close_orphans(self.tracking_uri, [self.experiment_id], once=True)
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a run from starting
            log.warning("MLflow: could not look for runs left RUNNING by killed processes (%s).", exc)
        if self.cfg.get("system_metrics"):
            mlflow.set_system_metrics_sampling_interval(self.cfg.get("system_metrics_interval") or 10)
        tags = {**run.tags, **_process_identity()}
        if run.group:
            tags["group"] = run.group
        tags["job_type"] = run.job_type
        if run.resume.get(self.name):  # reopen an existing run (status back to RUNNING); its params are kept
            active = mlflow.start_run(run_id=run.resume[self.name], tags=tags,
                                      log_system_metrics=bool(self.cfg.get("system_metrics")))
            self.run_id = active.info.run_id
            self._log_new_params(run.config)
            return
        else:
            active = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=run.name,
                parent_run_id=run.parents.get(self.name),
                nested=bool(run.parents.get(self.name)),  # the parent may be open in this process (a tuning study)
                tags=tags,
                description=run.description,
                log_system_metrics=bool(self.cfg.get("system_metrics")),
            )
        self.run_id = active.info.run_id
        self.log_params(run.config)

    def _log_new_params(self, config: dict[str, Any]) -> None:
        """A reopened run: MLflow refuses to change a param, so only the new ones are logged; a value that differs
        (``--epochs`` extending a resumed run) is recorded as the tag ``resumed.<param>``."""
        stored = self._mlflow.MlflowClient(tracking_uri=self.tracking_uri).get_run(self.run_id).data.params
        flat = {k: _param_value(v) for k, v in flatten(config).items()}
        new = {k: v for k, v in flat.items() if k not in stored}
        if new:
            self._mlflow.log_params(new, synchronous=self._sync)
        changed = {f"resumed.{k}": v for k, v in flat.items() if k in stored and stored[k] != v}
        if changed:
            self._mlflow.set_tags(changed)

    def _experiment_id(self) -> str:
        """The experiment's id, created if needed. A SQLite store is opened (its schema created or upgraded) and
        the experiment created under an inter-process file lock: without it, processes starting together on a
        fresh store race MLflow's migrations ("table params already exists")."""
        db = sqlite_path(self.tracking_uri)
        if db is None:
            return self._get_or_create_experiment()
        from filelock import FileLock

        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock", timeout=300):
            return self._get_or_create_experiment()

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        mlflow = self._mlflow
        experiment = mlflow.get_experiment_by_name(self.experiment)
        if experiment is not None:
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            for key, value in EXPERIMENT_TAGS.items():  # made by an older version, or by hand: never overwritten
                if key not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
        location = self.cfg.get("artifact_location")
        if location is None and self.tracking_uri.startswith("sqlite:"):
            location = (Path.cwd() / "mlartifacts").as_uri()
        elif location is not None and "://" not in str(location):
            location = Path(location).expanduser().resolve().as_uri()
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:  # created meanwhile by another process on the same server
            experiment = mlflow.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def attach(self, ref: dict[str, Any]) -> None:
        """Re-open an existing run (``run_ref()`` of the process that created it) to send it more: for replay.
        MLflow marks it RUNNING until :meth:`end_run` sets its final status."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id, self.run_id = ref.get("experiment_id"), ref["run_id"]
        mlflow.start_run(run_id=self.run_id, log_system_metrics=False)

    def flush(self):
        if not self._sync and self._mlflow is not None:
            self._mlflow.flush_async_logging()

    def end_run(self, status=FINISHED):
        # Only the run this tracker started: never an enclosing run of the same process (a tuning study's
        # parent run stays open while its trials run in-process, and a trial that failed to start must not end it).
        active = self._mlflow.active_run() if self._mlflow is not None else None
        if active is None or active.info.run_id != self.run_id:
            return
        try:
            self._mlflow.end_run(status=status)  # also waits for queued asynchronous logging
        finally:
            self._stop_system_metrics()  # MLflow skips this when set_terminated raises (the server is down)

    def abandon(self) -> None:
        """Forget this process's handle on the run without contacting the store (its status stays as the store
        has it): used when the end of the run is spooled for later."""
        from mlflow.tracking import fluent

        active = self._mlflow.active_run() if self._mlflow is not None else None
        if active is not None and active.info.run_id == self.run_id:
            stack = getattr(fluent, "_active_run_stack", None)  # internal; guarded, with a fallback below
            if stack is not None and hasattr(stack, "get"):
                stack.get().pop()
                os.environ.pop("MLFLOW_RUN_ID", None)
            else:
                try:
                    self._mlflow.end_run(status=KILLED)
                except Exception:  # noqa: BLE001 - the store is down: nothing to tell it
                    pass
        self._stop_system_metrics()

    def _stop_system_metrics(self) -> None:
        from mlflow.tracking import fluent

        monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(self.run_id, None)
        if monitor is not None:
            monitor.finish()

    # -- logging ----------------------------------------------------------------------------------
    def log_params(self, params):
        self._mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()}, synchronous=self._sync)

    def log_metrics(self, metrics, step, timestamp_ms: int | None = None):
        """``timestamp_ms``: when the metrics were computed (a replayed call keeps its original time)."""
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=self._sync,
                                 timestamp=timestamp_ms)

    def log_summary(self, metrics):
        # MLflow has no separate summary: final values are metrics; NaN (undefined AUC) is skipped.
        finite = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
        self._mlflow.log_metrics(finite)

    def set_tags(self, tags):
        self._mlflow.set_tags(tags)

    def log_artifact(self, path, artifact_path=None):
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dataset(self, dataset):
        """One MLflow dataset input per split (context train / val / test): the folder as source, the content
        fingerprint as digest, the class counts as its profile (shown on the run page under "Datasets")."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        class CXRDataset(MetaDataset):
            def __init__(self, source, name, digest, profile):
                self._profile = profile
                super().__init__(source, name=name, digest=digest)

            @property
            def profile(self):
                return self._profile

            def to_dict(self):  # MetaDataset leaves the profile out of what is stored
                return {**super().to_dict(), "profile": json.dumps(self._profile)}

        source = LocalArtifactDatasetSource(Path(dataset["root"]).resolve().as_uri())
        for split, counts in dataset["splits"].items():
            profile = {"num_images": int(sum(counts.values())), **{str(k): int(v) for k, v in counts.items()}}
            self._mlflow.log_input(
                CXRDataset(source, f"{dataset['name']}-{split}", dataset["fingerprint"], profile), context=split,
                tags={"source": dataset["source"], "fingerprint": dataset["fingerprint"],
                      "test_split": str(dataset.get("test_split", ""))})

    def log_image(self, path, name, caption=None):
        self._mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent) if "/" in name else None)

    def log_predictions(self, predictions: Predictions):
        """The predictions as an MLflow table artifact (viewable and comparable in the MLflow UI)."""
        import pandas as pd

        p = predictions
        table = pd.DataFrame({
            "file": [Path(x).name for x in p.paths],
            "true": [p.class_names[i] for i in p.y_true],
            "pred": [p.class_names[i] for i in p.y_pred],
            "correct": p.y_true == p.y_pred,
            **{f"p_{name}": p.probs[:, i] for i, name in enumerate(p.class_names)},
        })
        self._mlflow.log_table(table, artifact_file="test/predictions.json")

    def log_table(self, name, rows):
        """An MLflow table (``<name>.json``, shown and comparable in the UI's artifact view)."""
        import pandas as pd

        self._mlflow.log_table(pd.DataFrame(rows), artifact_file=f"{name}.json")

    def log_model(self, model, checkpoint, input_example, metadata):
        """Log with the MLflow PyTorch flavor (signature + input example, the checkpoint as an extra file); register
        it when the run's plan says so (``metadata["registry"]``, see :mod:`cxrtrack.tracking.registry`), with tags,
        a description and the ``latest-<source>`` / ``champion`` aliases. Without a plan it is not registered."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from cxrtrack.tracking.registry import REGISTRY_KEY, apply_mlflow_lifecycle

        metadata = dict(metadata)
        plan = metadata.pop(REGISTRY_KEY, None)
        # The pt2 format (torch.export) specialises a batch dimension of 1: the example needs >= 2 rows
        # for the logged model to accept any batch size.
        # workaround(mlflow): pt2 (the default format) needs an input_example, and a batch of >= 2 rows
        if input_example.shape[0] < 2:
            input_example = np.concatenate([input_example, input_example])
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        name = self.cfg.get("registered_model_name") or None
        registered = name if plan is not None and plan.get("register") else None
        from mlflow.utils import logging_utils

        logging_utils.disable_logging()  # its "Registered model ... Created version" prints: our one line says it
        try:
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                signature=infer_signature(input_example, output),
                registered_model_name=registered,
                # the training checkpoint rides along, so `make evaluate MODEL=models:/CustomCXRNet@champion` can use it
                extra_files=[str(checkpoint)],
                # workaround(mlflow): requirements stated, not inferred: inference runs a ~9 s subprocess per run
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
                metadata={k: (v if isinstance(v, (int, str)) else float(v)) for k, v in metadata.items()},
            )
        finally:
            logging_utils.enable_logging()
        self.model_uri = info.model_uri
        if not registered:
            if plan is not None:
                log.info("MLflow: model logged to the run, not registered: %s (--set tracking.register=true registers it).",
                         plan.get("reason"))
            return
        version = str(info.registered_model_version)
        done = apply_mlflow_lifecycle(mlflow.MlflowClient(tracking_uri=self.tracking_uri), registered, version, plan)
        self.registered = {"name": registered, **done}
        mlflow.set_tags({"registered_model": f"{registered}/{version}", "registered_aliases": ",".join(done["aliases"])})
        champion = ("now the champion" if done["champion"] else
                    f"champion stays version {done['champion_version']}")
        log.info("MLflow: registered '%s' version %s (aliases %s; %s: %s).", registered, version,
                 ", ".join(done["aliases"]), champion, done["why"])

    def run_ref(self):
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "model_uri": self.model_uri, "registered": self.registered}

    def describe(self):
        where = f"MLflow run {self.run_id} in experiment '{self.experiment}' at {redact(self.tracking_uri)}"
        url = redact(run_url(self.tracking_uri, self.experiment_id, self.run_id))
        curves = redact(curves_url(self.tracking_uri, self.experiment_id))
        after = "" if is_http(self.tracking_uri) else " (after `make mlflow-ui`)"
        return f"{where}: {url}{after}; train/val curves: {curves}"


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


def close_orphans(tracking_uri: str, experiment_ids: list[str], *, once: bool = False,
                  replay=None) -> list[tuple[str, str, str]]:
    """Find runs left RUNNING by a process of this project that is gone (killed with SIGKILL, the machine lost
    power) and end them KILLED, saying so. A run whose spool still holds calls is replayed instead, when
    ``replay`` (a function of the spool folder) is given, and left for `make replay` otherwise.

    Returns (run id, run name, what was done) for each run it acted on or left. ``once``: at most once per
    store and experiments in this process (every run start calls it)."""
    key = (tracking_uri, tuple(experiment_ids))
    if once and key in _orphans_checked:
        return []
    _orphans_checked.add(key)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    done = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000):
        tags, name, run_id = run.data.tags, run.info.run_name, run.info.run_id
        if PID_TAG not in tags or process_alive(tags) is not False:
            continue  # not ours, still running, or on another machine (cannot tell)
        from cxrtrack.tracking.spool import SPOOL_TAG, Spool

        spool = tags.get(SPOOL_TAG)
        if spool and replay is not None and Path(spool).is_dir():
            done.append((run_id, name, replay(Path(spool))))
            if client.get_run(run_id).info.status != "RUNNING":
                continue
        elif spool and Path(spool, "journal.jsonl").is_file():
            if Spool(Path(spool)).pending():
                log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone; its spool %s still holds "
                            "calls: `make replay` sends them and closes the run.", name, run_id, tags[PID_TAG], spool)
                done.append((run_id, name, f"left for `make replay` (spool {spool})"))
                continue
        client.set_tag(run_id, "cxrtrack.closed_by", f"a later run: process {tags[PID_TAG]} on {tags[HOST_TAG]} was "
                                                     f"gone at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_terminated(run_id, KILLED)
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone (killed?): marked KILLED.",
                    name, run_id, tags[PID_TAG])
        done.append((run_id, name, "marked KILLED"))
    return done

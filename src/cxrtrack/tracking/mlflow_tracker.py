"""MLflow backend: SQLite store in the project, system metrics, artifacts, model registry.

Store: ``tracking.mlflow.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (MLflow's own default, set explicitly: a stray ``./mlruns`` folder
would otherwise switch MLflow back to the deprecated file store). Artifacts of a new experiment go
to ``<cwd>/mlartifacts`` unless ``tracking.mlflow.artifact_location`` says otherwise. A tracking
server works the same way: ``MLFLOW_TRACKING_URI=http://host:5000``.

Usage telemetry is disabled (``MLFLOW_DISABLE_TELEMETRY``, set in ``cxrtrack.tracking`` before MLflow
is first imported) unless the user has set it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrtrack.config import flatten
from cxrtrack.tracking.base import FINISHED, BaseTracker, Predictions, RunInfo

log = logging.getLogger(__name__)

# workaround(mlflow): a param value over 6,000 characters is rejected; longer values are cut
_MAX_PARAM_VALUE = 6000  # MLflow's limit for one param value (characters)


def resolve_tracking_uri(configured: str | None) -> str:
    # workaround(mlflow): the SQLite URI is set explicitly; a stray ./mlruns would switch to the deprecated file store
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


class MLflowTracker(BaseTracker):
    name = "mlflow"

    def __init__(self, experiment: str, cfg: dict[str, Any]):
        self.experiment = experiment
        self.cfg = cfg
        self.tracking_uri = resolve_tracking_uri(cfg.get("tracking_uri"))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_uri: str | None = None
        # Asynchronous logging: metric and param calls are queued and written by MLflow's own thread,
        # so a slow store never holds up a training step; end_run waits for the queue.
        self._sync = not cfg.get("async_logging", False)
        self._mlflow = None

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self):
        import mlflow

        self._mlflow = mlflow

    def start_run(self, run: RunInfo):
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id = self._experiment_id()
        if self.cfg.get("system_metrics"):
            mlflow.set_system_metrics_sampling_interval(self.cfg.get("system_metrics_interval") or 10)
        tags = dict(run.tags)
        if run.group:
            tags["group"] = run.group
        tags["job_type"] = run.job_type
        if run.resume.get(self.name):  # reopen an existing run (status back to RUNNING); its params are kept
            active = mlflow.start_run(run_id=run.resume[self.name], tags=tags,
                                      log_system_metrics=bool(self.cfg.get("system_metrics")))
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

    def _experiment_id(self) -> str:
        mlflow = self._mlflow
        experiment = mlflow.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = self.cfg.get("artifact_location")
        if location is None and self.tracking_uri.startswith("sqlite:"):
            location = (Path.cwd() / "mlartifacts").as_uri()
        elif location is not None and "://" not in str(location):
            location = Path(location).expanduser().resolve().as_uri()
        return mlflow.create_experiment(self.experiment, artifact_location=location)

    def flush(self):
        if not self._sync and self._mlflow is not None:
            self._mlflow.flush_async_logging()

    def end_run(self, status=FINISHED):
        # Only the run this tracker started: never an enclosing run of the same process (a tuning study's
        # parent run stays open while its trials run in-process, and a trial that failed to start must not end it).
        active = self._mlflow.active_run() if self._mlflow is not None else None
        if active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run(status=status)  # also waits for queued asynchronous logging

    # -- logging ----------------------------------------------------------------------------------
    def log_params(self, params):
        self._mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()}, synchronous=self._sync)

    def log_metrics(self, metrics, step):
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=self._sync)

    def log_summary(self, metrics):
        # MLflow has no separate summary: final values are metrics; NaN (undefined AUC) is skipped.
        finite = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
        self._mlflow.log_metrics(finite)

    def set_tags(self, tags):
        self._mlflow.set_tags(tags)

    def log_artifact(self, path, artifact_path=None):
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

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
        """Log with the MLflow PyTorch flavor (signature + input example) and register it."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        # The pt2 format (torch.export) specialises a batch dimension of 1: the example needs >= 2 rows
        # for the logged model to accept any batch size.
        # workaround(mlflow): pt2 (the default format) needs an input_example, and a batch of >= 2 rows
        if input_example.shape[0] < 2:
            input_example = np.concatenate([input_example, input_example])
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        registered = self.cfg.get("registered_model_name") or None
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            signature=infer_signature(input_example, output),
            registered_model_name=registered,
            # workaround(mlflow): requirements stated, not inferred: inference runs a ~9 s subprocess per run
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
            metadata={k: (v if isinstance(v, (int, str)) else float(v)) for k, v in metadata.items()},
        )
        self.model_uri = info.model_uri
        if registered:
            log.info("MLflow: registered model '%s' version %s", registered, info.registered_model_version)

    def run_ref(self):
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "model_uri": self.model_uri}

    def describe(self):
        where = f"MLflow run {self.run_id} in experiment '{self.experiment}' at {self.tracking_uri}"
        if self.tracking_uri.startswith("sqlite:"):
            where += " (browse with `make mlflow-ui`)"
        return where


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

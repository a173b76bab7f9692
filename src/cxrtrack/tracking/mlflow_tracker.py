"""MLflow backend: one run in an MLflow store (params, metrics, artifacts, dataset inputs, the model registry).

The store itself (its URI and credentials, HTTP settings, the health probe, runs left RUNNING by killed processes,
UI links) is :mod:`cxrtrack.tracking.mlflow_store`. Usage telemetry is disabled (``MLFLOW_DISABLE_TELEMETRY``,
set in ``cxrtrack.tracking`` before MLflow is first imported) unless the user has set it.

A fresh SQLite store is created under an inter-process file lock (concurrent first runs would race MLflow's schema
migration). Artifacts of a new experiment go to ``<cwd>/mlartifacts`` unless ``tracking.mlflow.artifact_location``
says otherwise.

MLflow is imported in :meth:`MLflowTracker.setup`, not with this module, so ``--tracker none`` never pays for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from cxrtrack.config import flatten
from cxrtrack.errors import TrackerError
from cxrtrack.provenance import redact
from cxrtrack.tracking.base import FINISHED, KILLED, BaseTracker, Predictions, RunInfo

# close_run, download_checkpoint: imported from here by callers outside tracking/ (kept for them)
from cxrtrack.tracking.mlflow_store import (  # noqa: F401
    EXPERIMENT_TAGS,
    PING_TIMEOUT,
    apply_http_settings,
    close_orphans,
    close_run,
    curves_url,
    download_checkpoint,
    is_http,
    process_identity,
    resolve_tracking_uri,
    run_url,
    split_credentials,
    sqlite_path,
    uri_source,
)
from cxrtrack.tracking.mlflow_store import ping as ping_store

log = logging.getLogger(__name__)

# workaround(mlflow): a param value over 6,000 characters is rejected; longer values are cut
_MAX_PARAM_VALUE = 6000  # MLflow's limit for one param value (characters)


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
        self._mlflow: Any = None  # the mlflow module, once setup() has imported it

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self):
        apply_http_settings(self.cfg)
        import mlflow

        from cxrtrack.provenance import RedactingFilter

        # MLflow's own INFO lines (database set-up, system-metrics monitor start/stop) say nothing a user acts on:
        # warnings and errors only, unless -v asked for debug logging. The project logs what matters in its format.
        mlflow_log = logging.getLogger("mlflow")
        if logging.getLogger().level > logging.DEBUG and mlflow_log.level in (logging.NOTSET, logging.INFO):
            mlflow_log.setLevel(logging.WARNING)
        # MLflow logs through its own handler, not the project's: redact its records too (a URL, a secret value).
        for handler in logging.getLogger("mlflow").handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
        self._mlflow = mlflow

    def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        """Does the store answer (:func:`~cxrtrack.tracking.mlflow_store.ping`: one probe, seconds at most)?"""
        return ping_store(self.tracking_uri, timeout)

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
            close_orphans(self.tracking_uri, None, once=True)  # every experiment of the store
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a run from starting
            log.warning("MLflow: could not look for runs left RUNNING by killed processes (%s).", exc)
        if self.cfg.get("system_metrics"):
            mlflow.set_system_metrics_sampling_interval(self.cfg.get("system_metrics_interval") or 10)
        tags = {**run.tags, **process_identity()}
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

    def attach(self, ref: dict[str, Any], reopen: bool = True) -> None:
        """Log to an existing run (``run_ref()`` of the tracker that created it). ``reopen`` (replay): MLflow marks it
        RUNNING until :meth:`end_run` sets its final status. Not reopened (``make evaluate`` reporting back): the
        calls only add to it (each names its run), and its status and end time stay as they are."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id, self.run_id = ref.get("experiment_id"), ref["run_id"]
        if reopen:
            mlflow.start_run(run_id=self.run_id, log_system_metrics=False)

    def last_step(self, key: str) -> int:
        """The highest step of metric ``key`` in this run (0 when it has none): a new point goes after it."""
        history = self._mlflow.MlflowClient(tracking_uri=self.tracking_uri).get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

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
    # Each call names its run (run_id=), so it reaches this tracker's run whatever else is open in the process (a
    # study's parent run) and a run attached without reopening it (report back); only log_dataset and log_model,
    # whose MLflow calls have no run_id, need the run open in this process.
    def log_params(self, params):
        self._mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()}, synchronous=self._sync,
                                run_id=self.run_id)

    def log_metrics(self, metrics, step, timestamp_ms: int | None = None):
        """``timestamp_ms``: when the metrics were computed (a replayed call keeps its original time)."""
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=self._sync,
                                 timestamp=timestamp_ms, run_id=self.run_id)

    def log_summary(self, metrics):
        # MLflow has no separate summary: final values are metrics; NaN (undefined AUC) is skipped.
        finite = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
        self._mlflow.log_metrics(finite, run_id=self.run_id)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        # what mlflow.set_tags does, with the run named (it has no run_id argument)
        client = self._mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path, artifact_path=None):
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

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
        self._mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent) if "/" in name else None,
                                  run_id=self.run_id)

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
        self._mlflow.log_table(table, artifact_file="test/predictions.json", run_id=self.run_id)

    def log_table(self, name, rows):
        """An MLflow table (``<name>.json``, shown and comparable in the UI's artifact view)."""
        import pandas as pd

        self._mlflow.log_table(pd.DataFrame(rows), artifact_file=f"{name}.json", run_id=self.run_id)

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
        # tracking.mlflow.model_format: pt2 (torch.export, a traced graph: MLflow's default, 1-2 s) or pickle (the
        # module pickled: milliseconds, but loading it needs cxrtrack importable; the quick config's choice)
        model_format = self.cfg.get("model_format") or "pt2"
        # The pt2 format (torch.export) specialises a batch dimension of 1: the example needs >= 2 rows
        # for the logged model to accept any batch size.
        # workaround(mlflow): pt2 (the default format) needs an input_example, and a batch of >= 2 rows
        if model_format == "pt2" and input_example.shape[0] < 2:
            input_example = np.concatenate([input_example, input_example])
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        name = self.cfg.get("registered_model_name") or None
        registered = name if plan is not None and plan.get("register") else None
        import mlflow.pyfunc
        from mlflow.utils import environment, logging_utils

        logging_utils.disable_logging()  # its "Registered model ... Created version" prints: our one line says it
        # workaround(mlflow): the requirements below are this interpreter's own versions, so MLflow's check that they
        # match the environment cannot fail, yet it scans every installed distribution for it (1-2 s per model here).
        # It runs twice: when the model is saved (mlflow.utils.environment) and when log_model loads it back to
        # validate the input example (mlflow.pyfunc.load_model: ~0.6 s more in a quick run); both are skipped.
        try:
            with contextlib.ExitStack() as skip_check:
                for module in (environment, mlflow.pyfunc):
                    skip_check.enter_context(mock.patch.object(module, "warn_dependency_requirement_mismatches",
                                                               lambda *_, **__: None))
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=input_example,
                    signature=infer_signature(input_example, output),
                    serialization_format=model_format,
                    registered_model_name=registered,
                    # the training checkpoint rides along, for `make evaluate MODEL=models:/CustomCXRNet@champion`
                    extra_files=[str(checkpoint)],
                    # workaround(mlflow): requirements stated, not inferred: inference runs a ~9 s subprocess per run
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                      "numpy"],
                    metadata={k: (v if isinstance(v, (int, str)) else float(v)) for k, v in metadata.items()},
                )
        finally:
            logging_utils.enable_logging()
        self.model_uri = info.model_uri
        if not registered:
            if plan is not None:
                log.info("MLflow: model logged to the run, not registered: %s "
                         "(--set tracking.register=true registers it).", plan.get("reason"))
            return
        version = str(info.registered_model_version)
        done = apply_mlflow_lifecycle(mlflow.MlflowClient(tracking_uri=self.tracking_uri), registered, version, plan)
        self.registered = {"name": registered, **done}
        mlflow.set_tags({"registered_model": f"{registered}/{version}",
                         "registered_aliases": ",".join(done["aliases"])})
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

"""Experiment tracking: pick backends by name and get one :class:`TrackerGroup` for the trainer.

    tracker = build_tracker("both", cfg)      # or "mlflow", "wandb", "none", "mlflow,wandb"

Tracker-specific code lives only in this package; the backends import their library lazily, so
``--tracker none`` does not pay for importing MLflow or W&B.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# MLflow reads this once, when it is first imported: no usage telemetry unless the user opts in.
# workaround(mlflow): MLflow sends usage telemetry by default; opted out before its first import
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's per-file download/upload progress bars (hundreds of lines in a log file): off unless the user set it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The same rule for W&B's error reporting (crash reports sent to W&B), read when its service starts.
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

from cxrtrack.errors import ConfigError
from cxrtrack.tracking.base import FAILED, FINISHED, KILLED, Attachable, BaseTracker, Predictions, TrackerGroup


def _mlflow(cfg: dict[str, Any]) -> BaseTracker:
    from cxrtrack.tracking.mlflow_tracker import MLflowTracker
    from cxrtrack.tracking.spool import SpoolingTracker

    # Calls that fail after the start are spooled to outputs/<run>/spool/mlflow and replayed in order.
    mlflow_cfg = cfg["tracking"]["mlflow"]
    # ignore[abstract] below: base.forwards adds the run calls to the class when it is created, unseen by mypy
    return SpoolingTracker(MLflowTracker(cfg["experiment"], mlflow_cfg), cfg["output_dir"],  # type: ignore[abstract]
                           mlflow_cfg.get("reconnect_interval", 15))


def _wandb(cfg: dict[str, Any]) -> BaseTracker:
    from cxrtrack.tracking.wandb_tracker import WandbTracker

    return WandbTracker(cfg["tracking"]["wandb"].get("project") or cfg["experiment"], cfg["tracking"]["wandb"])


TRACKERS = {"mlflow": _mlflow, "wandb": _wandb}
ALIASES = {"both": ["mlflow", "wandb"], "all": list(TRACKERS), "none": []}


def tracker_names(spec: str) -> list[str]:
    """``"both"`` -> ``["mlflow", "wandb"]``; ``"mlflow,wandb"`` likewise; ``"none"`` -> ``[]``."""
    names: list[str] = []
    for part in str(spec).lower().replace(" ", "").split(","):
        for name in ALIASES.get(part, [part]):
            if name not in TRACKERS:
                raise ConfigError(
                    f"Unknown tracker '{part}'. Choose mlflow, wandb, both or none "
                    f"(--tracker on the command line, TRACKER= for make, tracking.tracker in the config)."
                )
            if name not in names:
                names.append(name)
    return names


def build_tracker(spec: str, cfg: dict[str, Any]) -> TrackerGroup:
    return TrackerGroup([TRACKERS[name](cfg) for name in tracker_names(spec)])  # type: ignore[abstract]  # as above


def _mlflow_run(ref: dict[str, Any], tracking_uri: str | None) -> BaseTracker:
    from cxrtrack.tracking.mlflow_tracker import MLflowTracker

    # the store the run was tracked in; without one recorded, --tracking-uri, MLFLOW_TRACKING_URI or ./mlflow.db
    return MLflowTracker(ref.get("experiment") or "", {"tracking_uri": ref.get("tracking_uri") or tracking_uri})


def _wandb_run(ref: dict[str, Any], tracking_uri: str | None) -> BaseTracker:
    from cxrtrack.tracking.wandb_tracker import WandbTracker

    return WandbTracker(ref.get("project") or "", {})


EXISTING_RUNS = {"mlflow": _mlflow_run, "wandb": _wandb_run}  # backends whose trackers are Attachable


@contextmanager
def attached(backend: str, ref: dict[str, Any], tracking_uri: str | None = None,
             **options: Any) -> Iterator[BaseTracker]:
    """The run ``ref`` of ``backend`` (its ``run_ref()``, e.g. from ``tracked.json``), to add to it without changing
    its status: ``make evaluate`` reports its results back through this. ``options`` go to the backend's ``attach``
    (W&B: ``job_type``)."""
    tracker = EXISTING_RUNS[backend](ref, tracking_uri)
    if not isinstance(tracker, Attachable):
        raise TypeError(f"the {backend} tracker cannot attach to an existing run")
    tracker.setup()
    tracker.attach(ref, reopen=False, **options)
    try:
        yield tracker
    finally:
        tracker.abandon()


__all__ = [
    "FAILED", "FINISHED", "KILLED", "BaseTracker", "Predictions", "TrackerGroup", "attached", "build_tracker",
    "tracker_names",
]

"""The scaffold every tracked run stands on, one place for the three kinds of run: a plain run
(``training/run.py``), the parent of a cross-validation and the parent of a seed study (``selection/``).

In the order a run uses them:

- :func:`open_run`: the run's name and its own new folder, its nested config (the secret-free config plus
  what was derived at run time) and its tags;
- :meth:`OpenRun.start`: the trackers open the run (``RunInfo``);
- :func:`publish_test`: the test evaluation's report files, plots, predictions table and model, with the
  registration plan of :mod:`cxrtrack.tracking.registry` (one rule for every path that logs a model);
- :meth:`OpenRun.publish`: the summary, the images and files collected on the way;
- :meth:`OpenRun.end`, :meth:`OpenRun.write_record`: the final status, then ``tracked.json`` (what was
  sent: the tracker group's record, ``group.record``) and ``timings.json`` (what each phase and each tracker
  call cost).

Each step times itself into ``OpenRun.timings`` (``tracker_start_s``, ``report_upload_s``,
``model_export_s``, ``tracker_end_s``, ``total_s``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxrtrack.config import deep_merge
from cxrtrack.data.dataset import CXRData, DataCache, build_data
from cxrtrack.errors import CXRError, TrackerError
from cxrtrack.provenance import environment_tags, git_info, scrub_secrets
from cxrtrack.tracking import TrackerGroup, registry
from cxrtrack.tracking.base import RunInfo, display_name
from cxrtrack.utils import atomic_write, timed

log = logging.getLogger(__name__)

TEST_PLOTS = ("confusion_matrix.png", "roc_curves.png", "test_predictions.png")
TEST_FILES = ("metrics", "report", "predictions")  # keys of report_on_test's paths: reports/<file name>


def make_run_name(cfg: dict[str, Any]) -> str:
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    stamp = datetime.now().strftime("%m%d-%H%M%S")
    size, epochs = cfg["data"]["image_size"], cfg["training"]["epochs"]
    return f"{cfg.get('config_name', 'run')}-{size}px-{epochs}ep-{stamp}"


def claim_run_dir(cfg: dict[str, Any], suffix: str = "") -> tuple[str, Path]:
    """A run name and its own new folder under ``output_dir``: ``mkdir`` without ``exist_ok`` is atomic,
    so two runs started in the same second (or a run name used before) never share a folder; the later one
    gets a ``-2``, ``-3``, ... suffix, which its tracked runs carry too. ``suffix`` (``cv5``, ``seeds3``)
    ends a generated name; a name the user chose is kept as it is."""
    base_name, root = make_run_name(cfg), Path(cfg["output_dir"])
    if suffix and not cfg.get("run_name"):
        base_name = f"{base_name}-{suffix}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            name = base_name if n == 1 else f"{base_name}-{n}"
            try:
                (root / name).mkdir()
            except FileExistsError:
                continue
            if n > 1:
                log.info("%s already exists (another run): this run is named %s.", root / base_name, name)
            return name, root / name
    except OSError as exc:
        raise CXRError(
            f"Cannot create the run folder under {root} ({exc.strerror or exc}). Free space or fix the "
            f"permissions there, or set output_dir to another folder (--set output_dir=...). Nothing was "
            f"trained."
        ) from None
    raise CXRError(f"{root} already holds 999 runs named {base_name}-*; pick another run name.")


class RunFiles:
    """The run's files in ``outputs/<run>/``, each written atomically; what could not be written (a full
    disk) is remembered instead of raised, so the run can still hand everything else to the trackers and
    then say exactly what is missing."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lost: dict[str, str] = {}  # relative path -> why it is not on disk

    def write(self, rel: str, write) -> Path | None:
        path = self.run_dir / rel
        try:
            return atomic_write(path, write)
        except OSError as exc:
            self.lost_file(rel, exc)
            return None

    def text(self, rel: str, text: str) -> Path | None:
        return self.write(rel, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def lost_file(self, rel: str, exc: OSError) -> None:
        self.lost[rel] = exc.strerror or str(exc)
        log.error("Could not write %s (%s).", self.run_dir / rel, self.lost[rel])


def load_data(cfg: dict[str, Any], data: CXRData | DataCache | None, timings: dict[str, float]) -> CXRData:
    """The run's data: the caller's, taken from its cache, or decoded now (timed as ``data_s``)."""
    with timed(timings, "data_s"):
        if isinstance(data, DataCache):
            return data.get(cfg["data"], cfg["seed"])
        return build_data(cfg["data"], cfg["seed"]) if data is None else data


def derived_config(cfg: dict[str, Any], data_summary: dict[str, Any], n_params: int,
                   device) -> dict[str, Any]:
    """What a training run records beside its config: the data, the model's size, the device and what the
    ``auto`` settings became on this machine (``resolved.*``)."""
    from cxrtrack.training.recipe import resolved_settings

    return {"dataset": data_summary, "model": {"num_parameters": n_params}, "device": device.type,
            "resolved": resolved_settings(cfg, device)}


def parent_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The trackers' settings for a parent run: no system metrics (they belong to the child runs)."""
    out = copy.deepcopy(cfg)
    out["tracking"]["mlflow"]["system_metrics"] = False
    return out


def child_parents(tracker: TrackerGroup, parents: dict[str, str] | None) -> dict[str, str]:
    """The parent ids a child run of ``tracker``'s run nests under (MLflow); W&B groups by name instead."""
    out = dict(parents or {})
    for t in tracker.trackers:
        run_id = (t.run_ref() or {}).get("run_id")
        if t.name == "mlflow" and run_id:
            out["mlflow"] = run_id
    return out


@dataclass
class OpenRun:
    """One run from :func:`open_run` to :meth:`write_record`: what it is and what it has yet to send."""

    name: str
    dir: Path
    safe_cfg: dict[str, Any]  # the only form of the config that leaves this process (trackers, files)
    config: dict[str, Any]  # nested, as RunInfo carries it (MLflow flattens it into params)
    tags: dict[str, str]
    files: RunFiles
    t0: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # logged by publish()
    images: dict[str, Path] = field(default_factory=dict)  # tracker name -> PNG, logged by publish()
    artifacts: dict[str, Path] = field(default_factory=dict)  # tracker path -> file, logged by publish()

    def start(self, tracker: TrackerGroup, *, group: str | None, job_type: str,
              parents: dict[str, str] | None, description: str, resume: dict[str, str] | None = None) -> None:
        """Open the run in every tracker; one that cannot start leaves no empty new run folder behind."""
        with timed(self.timings, "tracker_start_s"):
            try:
                tracker.start_run(RunInfo(self.name, self.config, self.tags, group=group, job_type=job_type,
                                          parents=dict(parents or {}), description=description,
                                          resume=dict(resume or {})))
            except TrackerError:
                if not resume:
                    try:
                        self.dir.rmdir()  # nothing was trained
                    except OSError:
                        pass
                raise

    def save(self, rel: str, text: str, name: str | None = None) -> None:
        """Write ``rel`` in the run's folder (atomically; a failure is remembered in :attr:`files`) and send
        it with the other files (``name``: its path in the trackers, default ``rel``)."""
        path = self.files.text(rel, text)
        if path is not None:
            self.artifacts[name or rel] = path

    def save_config(self) -> None:
        self.save("config.yaml", yaml.safe_dump(self.safe_cfg, sort_keys=False))

    def publish(self, tracker: TrackerGroup) -> None:
        """The summary, then the images and files collected in :attr:`images` and :attr:`artifacts`."""
        with timed(self.timings, "report_upload_s"):
            if self.summary:
                tracker.log_summary(self.summary)
            for name, path in self.images.items():
                tracker.log_image(path, name)
            for name, path in self.artifacts.items():
                tracker.log_artifact(path, str(Path(name).parent) if "/" in name else None)

    def end(self, tracker: TrackerGroup, status: str) -> None:
        with timed(self.timings, "tracker_end_s"):
            tracker.end_run(status)

    def write_record(self, tracker: TrackerGroup) -> None:
        """tracked.json (the group's record of what was sent, with each backend's run reference) and timings.json."""
        self.timings["total_s"] = time.perf_counter() - self.t0
        tracker.record.extra.update(runs={t.name: t.run_ref() for t in tracker.trackers},
                                    unsaved={display_name(k): v for k, v in tracker.problems().items()})
        self.files.text("tracked.json", tracker.record.to_json())
        self.files.text("timings.json", json.dumps({"trackers": tracker.names, **self.timings,
                                                    "calls": tracker.call_summary()}, indent=2))


def open_run(cfg: dict[str, Any], derived: dict[str, Any], *, device: str | None, data: CXRData | None = None,
             tags: dict[str, str] | None = None, suffix: str = "", at: tuple[str, Path] | None = None,
             t0: float | None = None, timings: dict[str, float] | None = None) -> OpenRun:
    """Name the run and claim its own new folder (``at``: the name and folder of a run being resumed), and
    write down what it records: the secret-free config merged with what was ``derived`` at run time, and its
    tags (git, environment, ``data``'s source and fingerprint, ``tags``, then ``tracking.tags``). ``device``
    None: a parent run whose children chose their own (no device tag). ``t0``, ``timings``: when the run
    started and what it timed before it was named (loading the data)."""
    name, run_dir = at if at is not None else claim_run_dir(cfg, suffix)
    safe_cfg = scrub_secrets(cfg)
    config = deep_merge(safe_cfg, derived)
    run_tags = {**git_info(), **environment_tags(device or "n/a")}
    if device is None:
        run_tags.pop("device", None)
    if data is not None:
        run_tags.update(dataset_source=data.source, dataset_fingerprint=data.fingerprint)
    run_tags.update({"config": cfg.get("config_name", ""), "model": "CustomCXRNet", **(tags or {}),
                     **{str(k): str(v) for k, v in safe_cfg["tracking"]["tags"].items()}})
    return OpenRun(name, run_dir, safe_cfg, config, run_tags, RunFiles(run_dir),
                   t0=time.perf_counter() if t0 is None else t0, timings={} if timings is None else timings)


def publish_test(run: OpenRun, tracker: TrackerGroup, cfg: dict[str, Any], data: CXRData, report,
                 paths: dict[str, Path], model, checkpoint: Path, loader, facts: dict[str, Any]) -> None:
    """Hand a test evaluation (``report_on_test``'s report and files) to the trackers: the test metrics go
    into the summary and the report files into the artifacts (both sent by :meth:`OpenRun.publish`); the
    plots, the predictions table and ``model`` (as it predicted the test split; ``facts``: what its metadata
    says besides its data and test metrics) go now. Whether the model is registered is decided by
    :func:`cxrtrack.tracking.registry.model_metadata`, as for every path that logs a model."""
    run.summary.update(report.tracked_metrics())
    run.artifacts.update({f"reports/{paths[key].name}": paths[key] for key in TEST_FILES})
    with timed(run.timings, "report_upload_s"):
        for name in TEST_PLOTS:
            tracker.log_image(paths[name], f"plots/{name}")
        tracker.log_predictions(report.predictions)
    if not cfg["tracking"]["log_model"]:
        return
    with timed(run.timings, "model_export_s"):
        example = next(iter(loader))[0][:2].cpu().numpy().astype(np.float32)
        tracker.log_model(model.cpu().eval(), checkpoint, example, registry.model_metadata(
            cfg, facts, source=data.source, fingerprint=data.fingerprint, run_name=run.name,
            git_commit=run.tags.get("git_commit", "unknown"), test_metrics=report.tracked_metrics(),
            test_split=data.test_split))

"""One experiment end to end: data -> model -> trainer -> test evaluation -> trackers.

``run_experiment(cfg)`` is what ``scripts/train.py`` calls. The same code path serves MLflow, W&B,
both or none: the tracker is built from its name and injected.

Everything a tracker receives is also written to ``<output_dir>/<run_name>/``, so a run's
checkpoint, plots, history and report are on disk even with ``--tracker none``. ``tracked.json``
there is the record of what was sent to the trackers (see ``tracking/readback.py``), and
``timings.json`` what each phase and each tracker call cost.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml
from PIL import Image

from cxrtrack.config import deep_merge, flatten
from cxrtrack.data.dataset import CXRData, DataCache, build_data
from cxrtrack.data.transforms import denormalize
from cxrtrack.models import build_model
from cxrtrack.provenance import environment_tags, git_info, scrub_secrets
from cxrtrack.tracking import FAILED, FINISHED, TrackerGroup, build_tracker
from cxrtrack.tracking.base import RunInfo
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training import plots
from cxrtrack.training.evaluate import TestReport, report_on_test
from cxrtrack.training.trainer import EpochCallback, FitResult, Trainer, build_criterion
from cxrtrack.utils import seed_everything, select_device, timed

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_name: str
    run_dir: Path
    status: str
    fit: FitResult
    test: TestReport | None
    params: dict[str, Any]  # flat, as MLflow stores them
    tags: dict[str, str]
    artifacts: dict[str, Path] = field(default_factory=dict)  # tracker path -> local file
    tracker: TrackerGroup | None = None
    timings: dict[str, float] = field(default_factory=dict)
    record: RunRecord | None = None  # what was sent to the trackers


def make_run_name(cfg: dict[str, Any]) -> str:
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    stamp = datetime.now().strftime("%m%d-%H%M%S")
    return f"{cfg.get('config_name', 'run')}-{cfg['data']['image_size']}px-{cfg['training']['epochs']}ep-{stamp}"


def run_config(safe_cfg: dict[str, Any], data_summary: dict[str, Any], n_params: int, device: str) -> dict[str, Any]:
    """The nested configuration a run records: the secret-free config plus what was derived at run time."""
    return deep_merge(safe_cfg, {"dataset": data_summary, "model": {"num_parameters": n_params}, "device": device})


def run_experiment(
    cfg: dict[str, Any],
    tracker: TrackerGroup | None = None,
    *,
    data: CXRData | DataCache | None = None,
    callbacks: tuple[EpochCallback, ...] = (),
    group: str | None = None,
    job_type: str = "train",
    parents: dict[str, str] | None = None,
    description: str | None = None,
) -> RunResult:
    """Train, evaluate and track one run of ``cfg``.

    ``data`` lets callers that run many experiments (tuning, repeated runs) decode the images once:
    a :class:`DataCache` (or an already built :class:`CXRData` matching ``cfg``). ``callbacks`` are
    called after every epoch besides the trackers' (e.g. Optuna pruning). ``group``, ``job_type``,
    ``parents`` and ``description`` place the tracked run in a hierarchy (see :class:`RunInfo`).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seed_everything(cfg["seed"], cfg["training"]["deterministic"])
    device = select_device(cfg["device"])
    # Before the data: a bad tracker name fails at once (backends import their library lazily, so this is cheap).
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], cfg)
    with timed(timings, "data_s"):
        if isinstance(data, DataCache):
            data = data.get(cfg["data"], cfg["seed"])
        elif data is None:
            data = build_data(cfg["data"], cfg["seed"])

    model = build_model(cfg["model"], cfg["data"])
    run_name = make_run_name(cfg)
    run_dir = Path(cfg["output_dir"]) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    summary = data.summary()
    safe_cfg = scrub_secrets(cfg)  # the only form of the config that leaves this process (trackers, files)
    config = run_config(safe_cfg, summary, model.num_parameters(), device.type)
    params = flatten(config)
    tags = {
        **git_info(),
        **environment_tags(device.type),
        "dataset_source": data.source,
        "dataset_fingerprint": data.fingerprint,
        "config": cfg.get("config_name", ""),
        "model": "CustomCXRNet",
        **{str(k): str(v) for k, v in safe_cfg["tracking"]["tags"].items()},
    }
    record = RunRecord(name=run_name, params=params, tags=tags)
    log.info("Run %s: CustomCXRNet with %s parameters on %s; tracking: %s",
             run_name, f"{model.num_parameters():,}", device, ", ".join(tracker.names) or "none")

    loaders = data.loaders(cfg["data"]["batch_size"], cfg["data"]["num_workers"], cfg["seed"])
    checkpoint_extra = {
        "class_names": list(data.class_names),
        "config": safe_cfg,
        "dataset": {k: v for k, v in summary.items() if k in ("source", "fingerprint", "root", "layout")},
        "run_name": run_name,
    }

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        with timed(timings, "epoch_logging_s"):
            tracker.log_metrics(metrics, step=epoch)
        for key, value in metrics.items():
            record.metrics.setdefault(key, []).append((epoch, value))

    trainer = Trainer(model, loaders, cfg["training"], device, run_dir / "checkpoints" / "best.pt",
                      checkpoint_extra, build_criterion(cfg["training"], data.train.labels, device),
                      callbacks=(log_epoch, *callbacks))

    artifacts: dict[str, Path] = {}
    images: dict[str, Path] = {}
    test_report = None
    timings["epoch_logging_s"] = 0.0
    with tracker:
        with timed(timings, "tracker_start_s"):
            tracker.start_run(RunInfo(run_name, config, tags, group=group or cfg["tracking"]["group"], job_type=job_type,
                                      parents=dict(parents or {}), description=description))
        images["samples/train_batch_augmented.png"] = _train_batch_montage(data, cfg["data"], run_dir)
        tracker.log_image(images["samples/train_batch_augmented.png"], "samples/train_batch_augmented.png",
                          caption="augmented training images as the model sees them")
        if data.skipped:
            artifacts["data/skipped_files.txt"] = run_dir / "skipped_files.txt"
            artifacts["data/skipped_files.txt"].write_text("".join(f"{s.path}\t{s.reason}\n" for s in data.skipped))

        with timed(timings, "fit_s"):
            fit = trainer.fit()

        with timed(timings, "test_eval_s"):  # evaluation and files on disk: no tracker involved
            artifacts.update(_write_run_files(safe_cfg, fit, run_dir))
            summary_metrics: dict[str, float] = {}
            if fit.best_epoch is not None:
                artifacts["checkpoints/best.pt"] = fit.checkpoint
                summary_metrics = {"best_epoch": fit.best_epoch, **{f"best_{k}": v for k, v in fit.best_metrics.items()},
                                   "epochs_completed": len(fit.history)}
                if fit.status == FINISHED and cfg["evaluation"]["run_test"]:
                    test_report, paths = _final_evaluation(trainer, data, fit, cfg, run_dir)
                    summary_metrics.update(test_report.tracked_metrics())
                    artifacts.update({f"reports/{paths[k].name}": paths[k] for k in ("metrics", "report", "predictions")})
                    images.update({f"plots/{name}": paths[name] for name in
                                   ("confusion_matrix.png", "roc_curves.png", "test_predictions.png")})
            if fit.history:
                images["plots/training_curves.png"] = _training_curves(fit, cfg, run_dir)

        with timed(timings, "report_upload_s"):
            if summary_metrics:
                tracker.log_summary(summary_metrics)
            for name, path in images.items():
                if name != "samples/train_batch_augmented.png":
                    tracker.log_image(path, name)
            for name, path in artifacts.items():
                tracker.log_artifact(path, str(Path(name).parent) if "/" in name else None)
            if test_report is not None:
                tracker.log_predictions(test_report.predictions)
                record.tables["test/predictions"] = len(test_report.predictions.y_true)
        with timed(timings, "model_export_s"):
            if test_report is not None and cfg["tracking"]["log_model"]:
                # the model holds the best checkpoint (_final_evaluation loaded it)
                example = next(iter(loaders["test"]))[0][:2].numpy().astype(np.float32)
                tracker.log_model(trainer.model.cpu().eval(), fit.checkpoint, example, {
                    "best_epoch": fit.best_epoch, "dataset_source": data.source,
                    "dataset_fingerprint": data.fingerprint, "image_size": data.image_size,
                    **{k: v for k, v in test_report.tracked_metrics().items() if "/" in k},
                })
                record.models.append("CustomCXRNet")
        record.summary = summary_metrics
        record.artifacts = sorted(artifacts)
        record.images = sorted(images)
        record.status = FAILED if fit.error is not None else fit.status
        if fit.error is not None:
            _write_run_record(run_dir, record, tracker, timings, t0)
            raise fit.error  # after the history and checkpoint reached the trackers; the run ends FAILED
        with timed(timings, "tracker_end_s"):
            tracker.end_run(fit.status)

    status = fit.status
    _write_run_record(run_dir, record, tracker, timings, t0)
    log.info("Time: data %.1fs, training %.1fs (tracker logging %.2fs), tracker start %.1fs, test evaluation %.1fs, "
             "final logging %.1fs + model %.1fs, tracker end %.1fs",
             timings["data_s"], timings["fit_s"], timings["epoch_logging_s"], timings["tracker_start_s"],
             timings["test_eval_s"], timings["report_upload_s"], timings["model_export_s"], timings["tracker_end_s"])
    if tracker.errors:
        log.warning("Tracker errors during this run: %s (see the warnings above).", dict(tracker.errors))
    log.info("Run %s %s in %.1fs. Local files: %s. %s", run_name, status, timings["total_s"], run_dir, tracker.describe())
    return RunResult(run_name, run_dir, status, fit, test_report, params, tags, artifacts, tracker, timings, record)


def _write_run_record(run_dir: Path, record: RunRecord, tracker: TrackerGroup, timings: dict[str, float], t0: float) -> None:
    """tracked.json (what the trackers were sent, with each backend's run reference) and timings.json."""
    timings["total_s"] = time.perf_counter() - t0
    record.extra = {"runs": {t.name: t.run_ref() for t in tracker.trackers}}
    (run_dir / "tracked.json").write_text(record.to_json())
    (run_dir / "timings.json").write_text(json.dumps(
        {"trackers": tracker.names, **timings, "calls": tracker.call_summary()}, indent=2))


def _train_batch_montage(data: CXRData, data_cfg: dict[str, Any], run_dir: Path) -> Path:
    """One augmented training batch, as the model sees it (after the train transform)."""
    n = min(16, len(data.train))
    batch = torch.stack([data.train[i][0] for i in range(n)])
    images = (denormalize(batch[:, 0], data_cfg) * 255).round().to(torch.uint8).numpy()
    path = run_dir / "samples" / "train_batch_augmented.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plots.image_montage(images)).save(path)
    return path


def _training_curves(fit: FitResult, cfg: dict[str, Any], run_dir: Path) -> Path:
    fig = plots.training_curves(fit.history, cfg["training"]["monitor"], fit.best_epoch)
    path = run_dir / "plots" / "training_curves.png"
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _write_run_files(safe_cfg: dict[str, Any], fit: FitResult, run_dir: Path) -> dict[str, Path]:
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    history = run_dir / "history.json"
    history.write_text(json.dumps({"best_epoch": fit.best_epoch, "monitor": safe_cfg["training"]["monitor"],
                                   "best_score": fit.best_score, "status": fit.status,
                                   "stopped_early": fit.stopped_early, "stop_reason": fit.stop_reason,
                                   "epochs": fit.history}, indent=2))
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(safe_cfg, sort_keys=False))
    return {"history.json": history, "config.yaml": config}


def _final_evaluation(trainer: Trainer, data: CXRData, fit: FitResult, cfg, run_dir: Path) -> tuple[TestReport, dict[str, Path]]:
    """Evaluate the best checkpoint (not the last epoch) on the official test split."""
    trainer.model.load_state_dict(torch.load(fit.checkpoint, map_location=trainer.device, weights_only=True)["model_state"])
    report, paths = report_on_test(trainer.model, trainer.loaders["test"], data, trainer.criterion, trainer.device,
                                   run_dir, cfg["evaluation"]["n_prediction_images"])
    log.info("Test (best checkpoint, epoch %d): loss %.4f acc %.3f macro-F1 %.3f ROC-AUC %.3f",
             fit.best_epoch, report.loss, report.metrics["acc"], report.metrics["f1_macro"], report.metrics["roc_auc_ovr_macro"])
    return report, paths

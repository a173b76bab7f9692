"""One experiment end to end: data -> model -> trainer -> test evaluation -> trackers.

``run_experiment(cfg)`` is what ``scripts/train.py`` calls. The same code path serves MLflow, W&B,
both or none: the tracker is built from its name and injected.

Everything a tracker receives is also written to ``<output_dir>/<run_name>/``, so a run's
checkpoint, plots, history and report are on disk even with ``--tracker none``.
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

from cxrtrack.config import flatten
from cxrtrack.data.dataset import build_data
from cxrtrack.data.transforms import denormalize
from cxrtrack.models import build_model
from cxrtrack.tracking import FINISHED, TrackerGroup, build_tracker
from cxrtrack.tracking.utils import environment_tags, git_info, scrub_secrets
from cxrtrack.training import plots
from cxrtrack.training.evaluate import TestReport, build_report, write_report
from cxrtrack.training.trainer import FitResult, Trainer, build_criterion
from cxrtrack.utils import seed_everything, select_device

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_name: str
    run_dir: Path
    status: str
    fit: FitResult
    test: TestReport | None
    params: dict[str, Any]
    tags: dict[str, str]
    artifacts: dict[str, Path] = field(default_factory=dict)  # tracker path -> local file
    tracker: TrackerGroup | None = None
    timings: dict[str, float] = field(default_factory=dict)


def make_run_name(cfg: dict[str, Any]) -> str:
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    stamp = datetime.now().strftime("%m%d-%H%M%S")
    return f"{cfg.get('config_name', 'run')}-{cfg['data']['image_size']}px-{cfg['training']['epochs']}ep-{stamp}"


def run_params(safe_cfg: dict[str, Any], data_summary: dict[str, Any], n_params: int, device: str) -> dict[str, Any]:
    """Flat parameters: the whole secret-free config, plus what was derived from it at run time."""
    params = flatten(safe_cfg)
    params.update({f"dataset.{k}": v for k, v in data_summary.items()})
    params["model.num_parameters"] = n_params
    params["device"] = device
    return params


def run_experiment(cfg: dict[str, Any], tracker: TrackerGroup | None = None) -> RunResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seed_everything(cfg["seed"], cfg["training"]["deterministic"])
    device = select_device(cfg["device"])
    # Before the data: a bad tracker name fails at once (backends import their library lazily, so this is cheap).
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], cfg)
    data = build_data(cfg["data"], cfg["seed"])
    timings["data_s"] = time.perf_counter() - t0

    model = build_model(cfg["model"], cfg["data"])
    run_name = make_run_name(cfg)
    run_dir = Path(cfg["output_dir"]) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    summary = data.summary()
    safe_cfg = scrub_secrets(cfg)  # the only form of the config that leaves this process (trackers, files)
    params = run_params(safe_cfg, summary, model.num_parameters(), device.type)
    tags = {
        **git_info(),
        **environment_tags(device.type),
        "dataset_source": data.source,
        "dataset_fingerprint": data.fingerprint,
        "config": cfg.get("config_name", ""),
        "model": "CustomCXRNet",
        **{str(k): str(v) for k, v in safe_cfg["tracking"]["tags"].items()},
    }
    log.info("Run %s: CustomCXRNet with %s parameters on %s; tracking: %s",
             run_name, f"{model.num_parameters():,}", device, ", ".join(tracker.names) or "none")

    loaders = data.loaders(cfg["data"]["batch_size"], cfg["data"]["num_workers"], cfg["seed"])
    checkpoint_extra = {
        "class_names": list(data.class_names),
        "config": safe_cfg,
        "dataset": {k: v for k, v in summary.items() if k in ("source", "fingerprint", "root", "layout")},
        "run_name": run_name,
    }
    trainer = Trainer(model, loaders, cfg["training"], tracker, device, run_dir / "checkpoints" / "best.pt",
                      checkpoint_extra, build_criterion(cfg["training"], data.train.labels, device))

    artifacts: dict[str, Path] = {}
    test_report = None
    with tracker:
        t_start = time.perf_counter()
        tracker.start_run(run_name, safe_cfg, tags)
        timings["tracker_start_s"] = time.perf_counter() - t_start
        tracker.log_params(params)
        _log_inputs(tracker, data, cfg["data"], run_dir, artifacts)

        t_fit = time.perf_counter()
        fit = trainer.fit()
        timings["fit_s"] = time.perf_counter() - t_fit

        t_final = time.perf_counter()
        artifacts.update(_write_run_files(safe_cfg, fit, run_dir))
        if fit.best_epoch is not None:
            artifacts["checkpoints/best.pt"] = fit.checkpoint
            summary_metrics = {"best_epoch": fit.best_epoch, **{f"best_{k}": v for k, v in fit.best_metrics.items()},
                               "epochs_completed": len(fit.history)}
            if fit.status == FINISHED:
                test_report = _final_evaluation(trainer, data, fit, cfg, run_dir, artifacts)
                summary_metrics.update(test_report.tracked_metrics())
            tracker.log_summary(summary_metrics)
        if fit.history:
            fig = plots.training_curves(fit.history, cfg["training"]["monitor"], fit.best_epoch)
            artifacts["plots/training_curves.png"] = run_dir / "plots" / "training_curves.png"
            fig.savefig(artifacts["plots/training_curves.png"], dpi=110)
            tracker.log_figure(fig, "plots/training_curves.png")
            plt.close(fig)
        for name, path in artifacts.items():
            if not name.startswith("plots/"):  # plots went to the trackers as figures
                tracker.log_artifact(path, str(Path(name).parent) if "/" in name else None)
        if test_report is not None:
            tracker.log_predictions(test_report.predictions)
            if cfg["tracking"]["log_model"]:  # the model holds the best checkpoint (_final_evaluation loaded it)
                example = next(iter(loaders["test"]))[0][:2].numpy().astype(np.float32)
                tracker.log_model(trainer.model.cpu().eval(), fit.checkpoint, example, {
                    "best_epoch": fit.best_epoch, "dataset_source": data.source,
                    "dataset_fingerprint": data.fingerprint, "image_size": data.image_size,
                    **{k: v for k, v in test_report.tracked_metrics().items() if "/" in k},
                })
        timings["finalize_s"] = time.perf_counter() - t_final
        if fit.error is not None:
            raise fit.error  # after the history and checkpoint reached the trackers; the run ends FAILED
        status = fit.status
        t_end = time.perf_counter()
        tracker.end_run(status)
        timings["tracker_end_s"] = time.perf_counter() - t_end

    timings["total_s"] = time.perf_counter() - t0
    (run_dir / "timings.json").write_text(json.dumps({"trackers": tracker.names, **timings}, indent=2))
    log.info("Time: data %.1fs, training %.1fs, tracker start %.1fs, evaluation + final logging %.1fs, tracker end %.1fs",
             timings["data_s"], timings["fit_s"], timings["tracker_start_s"], timings["finalize_s"], timings["tracker_end_s"])
    if tracker.errors:
        log.warning("Tracker errors during this run: %s (see the warnings above).", dict(tracker.errors))
    log.info("Run %s %s in %.1fs. Local files: %s. %s", run_name, status, timings["total_s"], run_dir, tracker.describe())
    return RunResult(run_name, run_dir, status, fit, test_report, params, tags, artifacts, tracker, timings)


def _log_inputs(tracker: TrackerGroup, data, data_cfg: dict[str, Any], run_dir: Path, artifacts: dict[str, Path]) -> None:
    """Record what went in: skipped files (by path) and one augmented training batch."""
    if data.skipped:
        path = run_dir / "skipped_files.txt"
        path.write_text("".join(f"{s.path}\t{s.reason}\n" for s in data.skipped))
        artifacts["data/skipped_files.txt"] = path
    n = min(16, len(data.train))
    batch = torch.stack([data.train[i][0] for i in range(n)])  # through the train transform (augmented)
    images = (denormalize(batch[:, 0], data_cfg) * 255).round().to(torch.uint8).numpy()
    tracker.log_image(plots.image_montage(images), "samples/train_batch_augmented.png",
                      caption=f"{n} augmented training images as the model sees them")


def _write_run_files(safe_cfg: dict[str, Any], fit: FitResult, run_dir: Path) -> dict[str, Path]:
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    history = run_dir / "history.json"
    history.write_text(json.dumps({"best_epoch": fit.best_epoch, "monitor": safe_cfg["training"]["monitor"],
                                   "best_score": fit.best_score, "status": fit.status,
                                   "stopped_early": fit.stopped_early, "epochs": fit.history}, indent=2))
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(safe_cfg, sort_keys=False))
    return {"history.json": history, "config.yaml": config}


def _final_evaluation(trainer: Trainer, data, fit: FitResult, cfg, run_dir: Path, artifacts: dict[str, Path]) -> TestReport:
    """Evaluate the best checkpoint (not the last epoch) on the official test split."""
    trainer.model.load_state_dict(torch.load(fit.checkpoint, map_location=trainer.device, weights_only=True)["model_state"])
    output = trainer.evaluate(trainer.loaders["test"])
    report = build_report(output, data, cfg["evaluation"]["n_prediction_images"])
    log.info("Test (best checkpoint, epoch %d): loss %.4f acc %.3f macro-F1 %.3f ROC-AUC %.3f",
             fit.best_epoch, report.loss, report.metrics["acc"], report.metrics["f1_macro"], report.metrics["roc_auc_ovr_macro"])
    figures = report.figures()
    paths = write_report(report, run_dir, figures)
    for fig_name, fig in figures.items():
        trainer.tracker.log_figure(fig, f"plots/{fig_name}")
        plt.close(fig)
    artifacts["reports/test_metrics.json"] = paths["metrics"]
    artifacts["reports/classification_report.txt"] = paths["report"]
    artifacts["reports/test_predictions.csv"] = paths["predictions"]
    for name in ("confusion_matrix.png", "roc_curves.png", "test_predictions.png"):
        artifacts[f"plots/{name}"] = paths[name]
    return report

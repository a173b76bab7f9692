"""Stratified k-fold cross-validation on train/: one parent run, one child run per fold, one final model.

``run_cv(cfg)`` with ``training.cv_folds: k``:

1. Pools train/ (the usual training and validation splits together; the test split is not touched) and
   draws ``k`` stratified folds with scikit-learn's ``StratifiedKFold`` (seeded by ``seed``).
2. Opens the parent run (MLflow: a parent run, the folds nested under it; W&B: a run of ``job_type`` cv,
   the folds in the same ``group``), then trains each fold as a normal run (``run_experiment``) with that
   fold as its validation split, no test evaluation and no model export.
3. Reports the CV mean and standard deviation (sample std, ddof=1) over the folds of every validation
   metric of each fold's selected epoch (``cv/val/loss_mean``, ``cv/val/loss_std``, ...), the epoch chosen
   on the mean validation curve, and a table with one row per fold.
4. Builds the final model (``training.cv_final``): ``ensemble``, the fold models' softmax average as one
   :class:`~cxrtrack.models.ensemble.Ensemble` (written as ``checkpoints/best.pt``, ``kind: ensemble``), or
   ``retrain``, one more child run on all of train/ with no validation split, stopped after the CV-chosen
   number of epochs (same schedule as the folds). Then, and only then, the test split is evaluated once
   and the model is logged and registered as one model in the parent run.

A run with ``evaluation.run_test: false`` (a tuning trial) stops after step 3 and keeps the fold ensemble as
its model (never retrained: a retrain exists to be tested and shipped). The CV mean of the monitored metric
is :attr:`CVResult.score` (what a tuning study optimises when ``cv_folds > 1``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrtrack.data.dataset import CXRData, DataCache
from cxrtrack.data.loading import build_loaders
from cxrtrack.models import build_model
from cxrtrack.selection.folds import fold_data, stratified_folds, train_pool
from cxrtrack.tracking import FINISHED, KILLED, TrackerGroup, build_tracker
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training.run import RunResult, run_experiment
from cxrtrack.training.scaffold import (
    child_parents,
    derived_config,
    load_data,
    open_run,
    parent_cfg,
    publish_test,
)
from cxrtrack.training.trainer import EpochCallback, FitResult, StopTraining, build_criterion
from cxrtrack.utils import atomic_write, seed_everything, select_device, timed, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    run_name: str
    run_dir: Path
    status: str
    folds: list[RunResult]
    stats: dict[str, dict[str, Any]]  # "val/loss" -> {"mean", "std", "values"}
    chosen_epoch: int | None  # the best epoch of the mean validation curve
    final: str | None  # "ensemble" | "retrain" | None (no final model: interrupted)
    fit: FitResult  # a FitResult view of the CV: best_score = the CV mean of the monitored metric
    test: Any = None  # TestReport of the final model, when evaluated
    retrain: RunResult | None = None
    record: RunRecord | None = None
    summary: dict[str, float] = field(default_factory=dict)
    tracker: TrackerGroup | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return self.fit.best_score

    @property
    def complete(self) -> bool:
        """Every store holds all of the parent run and of every fold (and retrain) run (see RunResult.complete)."""
        runs = [*self.folds, *([self.retrain] if self.retrain is not None else [])]
        return all(r.complete for r in runs) and not (self.tracker is not None and self.tracker.problems())


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite values."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "values": list(values)}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "values": list(values)}


def cv_stats(folds: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Every validation metric of each fold's selected (checkpointed) epoch: mean and std over the folds."""
    keys = sorted({k for r in folds for k in r.fit.best_metrics if k.startswith("val/")})
    stats = {k: mean_std([r.fit.best_metrics.get(k, math.nan) for r in folds]) for k in keys}
    stats["best_epoch"] = mean_std([float(r.fit.best_epoch or math.nan) for r in folds])
    return stats


def chosen_epoch(folds: list[RunResult], monitor: str, mode: str) -> tuple[int | None, list[float]]:
    """The epoch whose validation metric, averaged over the folds, is best (over the epochs every fold ran)."""
    curves = [[row[monitor] for row in r.fit.history if monitor in row] for r in folds]
    n = min((len(c) for c in curves), default=0)
    if n == 0:
        return None, []
    mean_curve = np.nanmean(np.array([c[:n] for c in curves], dtype=np.float64), axis=0)
    best = int(np.nanargmin(mean_curve) if mode == "min" else np.nanargmax(mean_curve))
    return best + 1, [float(v) for v in mean_curve]


def _child_cfg(cfg: dict[str, Any], name: str, out_dir: Path, tags: dict[str, str]) -> dict[str, Any]:
    child = copy.deepcopy(cfg)
    child["run_name"] = name
    child["output_dir"] = str(out_dir)
    child["evaluation"]["run_test"] = False  # the test split is evaluated once, for the final model only
    child["tracking"]["log_model"] = False  # the parent logs (and registers) the one final model
    child["tracking"]["tags"] = {**cfg["tracking"]["tags"], **tags}
    return child


def run_cv(
    cfg: dict[str, Any],
    tracker: TrackerGroup | None = None,
    *,
    data: CXRData | DataCache | None = None,
    callbacks: tuple[EpochCallback, ...] = (),
    group: str | None = None,
    job_type: str = "cv",
    parents: dict[str, str] | None = None,
    description: str | None = None,
) -> CVResult:
    """Cross-validate ``cfg`` (``training.cv_folds`` folds) and build its final model; see the module doc.

    ``callbacks`` run after every epoch of the *first* fold only (a tuning pruner: the first fold's curve is
    the early signal); a callback that stops training (``StopTraining``) stops the whole cross-validation.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    k, monitor, mode = cfg["training"]["cv_folds"], cfg["training"]["monitor"], cfg["training"]["monitor_mode"]
    seed_everything(cfg["seed"], cfg["training"]["deterministic"])
    device = select_device(cfg["device"])
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], parent_cfg(cfg))
    data = load_data(cfg, data, timings)
    pool = train_pool(data)
    splits = stratified_folds(pool.labels, k, cfg["seed"])
    n_params = build_model(cfg["model"], cfg["data"]).num_parameters()
    summary_data = {k2: v for k2, v in data.summary().items() if not k2.startswith(("n_train", "n_val"))}
    summary_data.update(n_train_pool=len(pool.labels), cv_folds=k)
    run = open_run(cfg, derived_config(cfg, summary_data, n_params, device), device=device.type, data=data,
                   tags={"cv_folds": str(k), "cv_final": cfg["training"]["cv_final"]}, suffix=f"cv{k}", t0=t0,
                   timings=timings)
    name, group = run.name, group or cfg["tracking"]["group"] or run.name
    log.info("Cross-validation %s: %d stratified folds of %d train/ images (seed %d); final model: %s; tracking: %s",
             name, k, len(pool.labels), cfg["seed"], cfg["training"]["cv_final"], ", ".join(tracker.names) or "none")

    stopped: dict[str, str] = {}

    def guarded(callback: EpochCallback) -> EpochCallback:
        def wrapped(epoch: int, row: dict[str, float]) -> None:
            try:
                callback(epoch, row)
            except StopTraining as stop:
                stopped["reason"] = str(stop)
                raise
        return wrapped

    folds: list[RunResult] = []
    status, final, test_report, retrain, checkpoint = FINISHED, None, None, None, None
    summary = run.summary
    with tracker:
        run.start(tracker, group=group, job_type=job_type, parents=parents,
                  description=description or f"{k}-fold cross-validation of {cfg.get('config_name')}: one child "
                  f"run per fold; the CV mean +- std of every validation metric here.")
        nested = child_parents(tracker, parents)
        for i, (tr, va) in enumerate(splits, 1):
            fcfg = _child_cfg(cfg, f"{name}-fold{i}", run.dir / "folds", {"cv": name, "fold": str(i)})
            with timed(timings, "fit_s"):
                result = run_experiment(fcfg, data=fold_data(data, pool, tr, va, cfg["data"]),
                                        callbacks=tuple(guarded(c) for c in callbacks) if i == 1 else (), group=group,
                                        job_type="fold", parents=nested,
                                        description=f"Fold {i} of {k} of cross-validation {name}")
            folds.append(result)
            if result.status == KILLED:
                status = KILLED
                break
            if stopped:
                log.info("Cross-validation %s stopped after fold %d: %s.", name, i, stopped["reason"])
                break
        stats = cv_stats(folds)
        epoch, mean_curve = chosen_epoch(folds, monitor, mode)
        for key, s in stats.items():
            summary[f"cv/{key}_mean"], summary[f"cv/{key}_std"] = s["mean"], s["std"]
        summary.update({"cv/folds_completed": len(folds), "cv/chosen_epoch": epoch or math.nan})
        oof = out_of_fold(folds, splits, pool) if len(folds) == k and not stopped else None
        if oof is not None:
            summary.update({f"cv/oof/{key}": v for key, v in oof_metrics(oof, data.class_names).items()})
            run.artifacts["cv/oof_predictions.csv"] = write_oof(oof, data.class_names, run.dir / "oof_predictions.csv")
        rows = [{"fold": i, "run_name": r.run_name, "n_train": r.params.get("dataset.n_train"),
                 "n_val": r.params.get("dataset.n_val"), "best_epoch": r.fit.best_epoch,
                 **{key: r.fit.best_metrics.get(key) for key in stats if key.startswith("val/")}}
                for i, r in enumerate(folds, 1)]
        # no test split to evaluate (a tuning trial, or data.test_fraction 0): the fold ensemble, never retrained
        tested = cfg["evaluation"]["run_test"] and len(data.test) > 0
        if status == FINISHED and not stopped and epoch is not None:
            final = cfg["training"]["cv_final"] if tested else "ensemble"
            checkpoint = run.dir / "checkpoints" / "best.pt"
            with timed(timings, "final_model_s"):
                if final == "retrain":
                    retrain = _retrain(cfg, data, pool, name, run.dir, epoch, group, nested)
                    if retrain.status == KILLED:
                        status, final, checkpoint = KILLED, None, None
                    else:
                        _copy_checkpoint(retrain.fit.checkpoint, checkpoint,
                                         {"kind": "retrain", "cv": _ckpt_cv(stats, epoch, k)})
                else:
                    save_ensemble([r.fit.checkpoint for r in folds], checkpoint, run.safe_cfg, data, name, stats,
                                  epoch, k)
            if checkpoint is not None:
                run.artifacts["checkpoints/best.pt"] = checkpoint
            if status == FINISHED and tested and checkpoint is not None:
                with timed(timings, "test_eval_s"):
                    test_report, paths, model, loader = _final_evaluation(checkpoint, cfg, data, pool, device, run.dir)
                publish_test(run, tracker, cfg, data, test_report, paths, model, checkpoint, loader,
                             {"final": final, "folds": k, "best_epoch": epoch, "image_size": data.image_size})
        run.summary = summary = {key: v for key, v in summary.items() if not (isinstance(v, float) and math.isnan(v))}
        run.save("cv_summary.json", json.dumps({"stats": stats, "chosen_epoch": epoch, "mean_val_curve": mean_curve,
                                                "monitor": monitor, "final": final, "folds": rows, "summary": summary},
                                               indent=2, default=str))
        run.save_config()
        if rows:
            tracker.log_table("cv/folds", rows)
        run.publish(tracker)
        tracker.set_tags({"cv_final_model": final or "none"})
        run.end(tracker, status)
    timings["fit_s"] = sum(r.timings.get("fit_s", 0.0) for r in folds)
    run.write_record(tracker)
    score = stats.get(monitor, {}).get("mean") if not stopped and folds else None
    # where the final model is, or would have been had the CV not stopped first (as a trainer's FitResult says)
    planned = checkpoint if checkpoint is not None else run.dir / "checkpoints" / "best.pt"
    fit = FitResult(history=[{"epoch": e, monitor: v} for e, v in enumerate(mean_curve, 1)], best_epoch=epoch,
                    best_score=score, status=status, stopped_early=bool(stopped), checkpoint=planned,
                    best_metrics={key: s["mean"] for key, s in stats.items() if key.startswith("val/")},
                    stop_reason=stopped.get("reason"))
    _log_outcome(name, status, stats, epoch, final, test_report, run.dir, tracker, summary)
    return CVResult(name, run.dir, status, folds, stats, epoch, final, fit, test_report, retrain, tracker.record,
                    summary, tracker, timings)


@dataclass
class OutOfFold:
    """Every train/ image predicted once, by the fold model that did not train on it (its selected epoch)."""

    y_true: np.ndarray
    probs: np.ndarray
    fold: np.ndarray
    paths: list[str]


def out_of_fold(folds: list[RunResult], splits, pool) -> OutOfFold | None:
    """The folds' validation predictions pooled (None when a fold kept none, e.g. it never improved)."""
    vals = [r.fit.val_output for r in folds if r.fit.val_output is not None]
    if len(vals) < len(folds):
        return None
    return OutOfFold(np.concatenate([v.y_true for v in vals]), np.concatenate([v.probs for v in vals]),
                     np.concatenate([np.full(len(v.y_true), i) for i, v in enumerate(vals, 1)]),
                     [str(pool.paths[j]) for _, va in splits[:len(folds)] for j in va])


OOF_KEYS = ("acc", "f1_macro", "roc_auc_ovr_macro")


def oof_metrics(oof: OutOfFold, class_names) -> dict[str, float]:
    """Accuracy, macro-F1, macro ROC-AUC and per-class recall of the pooled out-of-fold predictions: one figure over
    every train/ image (the fold means weigh ~50-image folds alike and are noisier per class)."""
    from cxrtrack.training.metrics import classification_metrics

    m = classification_metrics(oof.y_true, oof.probs.argmax(1), oof.probs, tuple(class_names))
    return {key: v for key, v in m.items() if key in OOF_KEYS or key.startswith("recall_") and key != "recall_macro"}


def write_oof(oof: OutOfFold, class_names, path: Path) -> Path:
    """oof_predictions.csv: path, fold, label, prediction and the probability of every class, one row per image."""
    import pandas as pd

    from cxrtrack.data.dataset import slug

    frame = pd.DataFrame({"path": oof.paths, "fold": oof.fold, "label": [class_names[i] for i in oof.y_true],
                          "predicted": [class_names[i] for i in oof.probs.argmax(1)],
                          **{f"p_{slug(name)}": oof.probs[:, i] for i, name in enumerate(class_names)}})
    write_text_atomic(path, frame.to_csv(index=False))
    return path


def _ckpt_cv(stats: dict[str, dict[str, Any]], epoch: int | None, k: int) -> dict[str, Any]:
    return {"folds": k, "chosen_epoch": epoch, **{f"{key}_mean": s["mean"] for key, s in stats.items()},
            **{f"{key}_std": s["std"] for key, s in stats.items()}}


def save_ensemble(checkpoints: list[Path], path: Path, safe_cfg: dict[str, Any], data: CXRData, name: str,
                  stats: dict[str, dict[str, Any]], epoch: int | None, k: int) -> Path:
    """One checkpoint holding every fold model (plain types: loads with ``weights_only=True``)."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in checkpoints]
    state = {
        "kind": "ensemble",
        "members": [s["model_state"] for s in states],
        "member_epochs": [s["epoch"] for s in states],
        "member_weights": [s.get("weights", "raw") for s in states],
        "model_hparams": states[0]["model_hparams"],
        "config": safe_cfg,
        "class_names": list(data.class_names),
        "dataset": {key: v for key, v in data.summary().items() if key in ("source", "fingerprint", "root", "layout")},
        "run_name": name,
        "cv": _ckpt_cv(stats, epoch, k),
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def _copy_checkpoint(source: Path, dest: Path, extra: dict[str, Any]) -> None:
    state = torch.load(source, map_location="cpu", weights_only=True)
    state.update(extra)
    atomic_write(dest, lambda tmp: torch.save(state, tmp))


def _retrain(cfg, data, pool, name, run_dir, epoch, group, nested) -> RunResult:
    """All of train/, no validation split, the folds' schedule, stopped after the CV-chosen epoch."""
    rcfg = _child_cfg(cfg, f"{name}-retrain", run_dir / "folds", {"cv": name, "cv_retrain_epochs": str(epoch)})

    def stop_at(e: int, row: dict[str, float]) -> None:
        if e >= epoch:
            raise StopTraining(f"the CV-chosen number of epochs ({epoch}) is reached")

    all_train = fold_data(data, pool, np.arange(len(pool.labels)), None, cfg["data"])
    log.info("Retraining on all %d train/ images for the CV-chosen %d epochs (no validation split).",
             len(pool.labels), epoch)
    return run_experiment(rcfg, data=all_train, callbacks=(stop_at,), group=group, job_type="retrain", parents=nested,
                          description=f"Retrain of cross-validation {name} on all of train/ for {epoch} epochs")


def _final_evaluation(checkpoint: Path, cfg, data: CXRData, pool, device, run_dir: Path):
    """The one evaluation of the test split: the final model, predicting as configured (TTA)."""
    from cxrtrack.models.ensemble import with_tta
    from cxrtrack.training.evaluate import load_checkpoint, report_on_test

    model, _ = load_checkpoint(checkpoint, device)
    model = with_tta(model, cfg["evaluation"]["tta"])
    criterion = build_criterion(cfg["training"], pool.labels, device)
    loader = build_loaders(data, cfg, device)["test"]
    report, paths = report_on_test(model, loader, data, criterion, device, run_dir,
                                   cfg["evaluation"]["n_prediction_images"])
    return report, paths, model, loader


def _log_outcome(name, status, stats, epoch, final, test_report, run_dir, tracker, summary) -> None:
    parts = [f"{key} {s['mean']:.4f} ± {s['std']:.4f}" for key, s in stats.items() if key.startswith("val/")]
    log.info("Cross-validation %s %s: %s over %d folds (sample std); chosen epoch %s; final model: %s.",
             name, status, ", ".join(parts), len(stats.get("best_epoch", {}).get("values", [])), epoch, final or "none")
    oof = [f"{key.removeprefix('cv/oof/')} {v:.3f}" for key, v in summary.items() if key.startswith("cv/oof/")]
    if oof:
        log.info("Out-of-fold (every train/ image predicted once by the fold that did not train on it): %s.",
                 ", ".join(oof))
    if test_report is not None:
        m = test_report.metrics
        log.info("Test (%s, evaluated once): loss %.4f acc %.3f macro-F1 %.3f ROC-AUC %.3f", final, test_report.loss,
                 m["acc"], m["f1_macro"], m["roc_auc_ovr_macro"])
    log.info("Local files: %s. %s", run_dir, tracker.describe())

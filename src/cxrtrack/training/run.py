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
import math
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
from cxrtrack.data.loading import build_loaders, example_batch
from cxrtrack.data.transforms import denormalize
from cxrtrack.errors import CXRError, RunFailedError, TrackerError
from cxrtrack.models import build_model
from cxrtrack.provenance import environment_tags, git_info, scrub_secrets
from cxrtrack.tracking import FAILED, FINISHED, TrackerGroup, build_tracker, registry
from cxrtrack.tracking.base import RunInfo, display_name
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training import plots
from cxrtrack.training.evaluate import TestReport, report_on_test
from cxrtrack.training.recipe import Recipe, resolved_settings
from cxrtrack.training.resume import RUNS_FILE, ResumePoint, write_runs_file
from cxrtrack.training.trainer import EpochCallback, FitResult, Trainer, build_criterion
from cxrtrack.utils import atomic_write, seed_everything, select_device, timed

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
    problems: dict[str, str] = field(default_factory=dict)  # tracker -> what its store does not hold (yet)

    @property
    def complete(self) -> bool:
        """Every store holds everything the run sent."""
        return not self.problems


def make_run_name(cfg: dict[str, Any]) -> str:
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    stamp = datetime.now().strftime("%m%d-%H%M%S")
    return f"{cfg.get('config_name', 'run')}-{cfg['data']['image_size']}px-{cfg['training']['epochs']}ep-{stamp}"


def run_config(safe_cfg: dict[str, Any], data_summary: dict[str, Any], n_params: int, device: str) -> dict[str, Any]:
    """The nested configuration a run records: the secret-free config plus what was derived at run time."""
    return deep_merge(safe_cfg, {"dataset": data_summary, "model": {"num_parameters": n_params}, "device": device})


def claim_run_dir(cfg: dict[str, Any]) -> tuple[str, Path]:
    """A run name and its own new folder under ``output_dir``: ``mkdir`` without ``exist_ok`` is atomic, so two
    runs started in the same second (or a run name used before) never share a folder; the later one gets a
    ``-2``, ``-3``, ... suffix, which its tracked runs carry too."""
    base_name, root = make_run_name(cfg), Path(cfg["output_dir"])
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
            f"Cannot create the run folder under {root} ({exc.strerror or exc}). Free space or fix the permissions "
            f"there, or set output_dir to another folder (--set output_dir=...). Nothing was trained."
        ) from None
    raise CXRError(f"{root} already holds 999 runs named {base_name}-*; pick another run name.")


class RunFiles:
    """The run's files in ``outputs/<run>/``, each written atomically; what could not be written (a full disk)
    is remembered instead of raised, so the run can still hand everything else to the trackers and then say
    exactly what is missing."""

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
    resume: ResumePoint | None = None,
) -> RunResult:
    """Train, evaluate and track one run of ``cfg``.

    ``data`` lets callers that run many experiments (tuning, repeated runs) decode the images once:
    a :class:`DataCache` (or an already built :class:`CXRData` matching ``cfg``). ``callbacks`` are
    called after every epoch besides the trackers' (e.g. Optuna pruning). ``group``, ``job_type``,
    ``parents`` and ``description`` place the tracked run in a hierarchy (see :class:`RunInfo`). ``resume`` (a
    :class:`~cxrtrack.training.resume.ResumePoint`) continues an interrupted run in its folder and tracked runs.

    How it ends: a :class:`RunResult` for a FINISHED or KILLED run (``result.problems`` lists what a tracker
    does not hold yet, e.g. calls waiting in a spool); a FAILED run raises after its trackers were closed
    FAILED: :class:`RunFailedError` (one paragraph: what was lost, where the rest is) or the original exception.
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
    if resume is not None:
        trained_on = (resume.state.get("dataset") or {}).get("fingerprint")
        if trained_on and trained_on != data.fingerprint:
            raise CXRError(f"{resume.run_name} was trained on data with fingerprint {trained_on}; the data found now "
                           f"({data.location.root}) has fingerprint {data.fingerprint}. A run resumes on the same data only: "
                           f"point DATA= at it, or start a new run.")
        run_name, run_dir = resume.run_name, resume.run_dir
        log.info("Resuming %s after epoch %d in %s (tracked runs: %s).", run_name, resume.epoch, run_dir,
                 ", ".join(f"{display_name(k)} {v}" for k, v in resume.tracker_ids().items()) or "none")
    else:
        run_name, run_dir = claim_run_dir(cfg)
    files = RunFiles(run_dir)

    summary = data.summary()
    safe_cfg = scrub_secrets(cfg)  # the only form of the config that leaves this process (trackers, files)
    config = deep_merge(run_config(safe_cfg, summary, model.num_parameters(), device.type),
                        {"resolved": resolved_settings(cfg, device)})  # what the 'auto' settings became here
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
    record.extra["dataset"] = dataset_lineage(data)
    log.info("Run %s: CustomCXRNet with %s parameters on %s; tracking: %s",
             run_name, f"{model.num_parameters():,}", device, ", ".join(tracker.names) or "none")

    loaders = build_loaders(data, cfg, device)  # DataLoaders, or batches cut on the device (data.pipeline)
    checkpoint_extra = {
        "class_names": list(data.class_names),
        "config": safe_cfg,
        "dataset": {k: v for k, v in summary.items() if k in ("source", "fingerprint", "root", "layout")},
        "run_name": run_name,
    }

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        if row.get("lr", 0) > 0:  # MLflow draws a constant lr of 0.001 as a flat line labelled 0; -3 reads as 1e-3
            metrics["log10_lr"] = math.log10(row["lr"])
        with timed(timings, "epoch_logging_s"):
            tracker.log_metrics(metrics, step=epoch)
        for key, value in metrics.items():
            record.metrics.setdefault(key, []).append((epoch, value))

    trainer = Trainer(model, loaders, cfg["training"], device, run_dir / "checkpoints" / "best.pt",
                      checkpoint_extra, build_criterion(cfg["training"], data.train.labels, device),
                      callbacks=(log_epoch, *callbacks), recipe=Recipe(cfg, len(data.class_names)))
    if resume is not None:
        trainer.resume_from = resume.state
        for row in resume.state["history"]:  # logged before the interruption: the record holds the whole run
            for key, value in row.items():
                if key != "epoch":
                    record.metrics.setdefault(key, []).append((int(row["epoch"]), value))
            if row.get("lr", 0) > 0:
                record.metrics.setdefault("log10_lr", []).append((int(row["epoch"]), math.log10(row["lr"])))

    artifacts: dict[str, Path] = {}
    images: dict[str, Path] = {}
    test_report = None
    timings["epoch_logging_s"] = 0.0
    with tracker:
        with timed(timings, "tracker_start_s"):
            try:
                tracker.start_run(RunInfo(run_name, config, tags, group=group or cfg["tracking"]["group"],
                                          job_type=job_type, parents=dict(parents or {}),
                                          description=description or _describe_run(cfg, data),
                                          resume=resume.tracker_ids() if resume is not None else {}))
            except TrackerError:
                if resume is None:
                    _remove_if_empty(run_dir)  # nothing was trained: leave no empty run folder behind
                raise
        try:  # where the tracked runs are, for --resume (tracked.json is only written at the end)
            write_runs_file(run_dir, run_name, {t.name: t.run_ref() for t in tracker.trackers})
        except OSError as exc:
            files.lost_file(RUNS_FILE, exc)
        tracker.log_dataset(dataset_lineage(data))
        montage = files.write("samples/train_batch_augmented.png",
                              lambda tmp: _train_batch_montage(example_batch(data, loaders), cfg["data"], tmp))
        if montage is not None:
            images["samples/train_batch_augmented.png"] = montage
            tracker.log_image(montage, "samples/train_batch_augmented.png",
                              caption="augmented training images as the model sees them")
        if data.skipped:
            path = files.text("skipped_files.txt", "".join(f"{s.path}\t{s.reason}\n" for s in data.skipped))
            if path is not None:
                artifacts["data/skipped_files.txt"] = path

        with timed(timings, "fit_s"):
            fit = trainer.fit()
        if isinstance(fit.error, OSError):  # the checkpoint could not be written (a full disk)
            files.lost_file("checkpoints/best.pt", fit.error)

        with timed(timings, "test_eval_s"):  # evaluation and files on disk: no tracker involved
            artifacts.update(_write_run_files(safe_cfg, fit, files))
            summary_metrics: dict[str, float] = {}
            if fit.best_epoch is not None:
                artifacts["checkpoints/best.pt"] = fit.checkpoint
                summary_metrics = {"best_epoch": fit.best_epoch, **{f"best_{k}": v for k, v in fit.best_metrics.items()},
                                   "epochs_completed": len(fit.history)}
                if fit.status == FINISHED and cfg["evaluation"]["run_test"] and len(data.test) and not files.lost:
                    try:
                        test_report, paths = _final_evaluation(trainer, data, fit, cfg, run_dir)
                    except OSError as exc:
                        files.lost_file("reports/ and plots/ of the test evaluation", exc)
                    else:
                        summary_metrics.update(test_report.tracked_metrics())
                        artifacts.update({f"reports/{paths[k].name}": paths[k] for k in ("metrics", "report", "predictions")})
                        images.update({f"plots/{name}": paths[name] for name in
                                       ("confusion_matrix.png", "roc_curves.png", "test_predictions.png")})
            if fit.history:
                curves = files.write("plots/training_curves.png", lambda tmp: _training_curves(fit, cfg, tmp))
                if curves is not None:
                    images["plots/training_curves.png"] = curves

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
                example = next(iter(loaders["test"]))[0][:2].cpu().numpy().astype(np.float32)
                # as it predicted the test split: the checkpointed weights, with TTA when evaluation.tta asks
                tracker.log_model(trainer.recipe.predictor(trainer.model).cpu().eval(), fit.checkpoint, example,
                                  registry.model_metadata(
                                      cfg, {"best_epoch": fit.best_epoch, "image_size": data.image_size},
                                      source=data.source, fingerprint=data.fingerprint, run_name=run_name,
                                      git_commit=tags.get("git_commit", "unknown"),
                                      test_metrics=test_report.tracked_metrics()))
                record.models.append("CustomCXRNet")
        # The run's own record lost on a full disk is a failed run, whatever training did.
        status = FAILED if fit.error is not None or (files.lost and fit.status == FINISHED) else fit.status
        record.summary = summary_metrics
        record.artifacts = sorted(artifacts)
        record.images = sorted(images)
        record.status = status
        with timed(timings, "tracker_end_s"):
            tracker.end_run(status)

    _write_run_record(files, record, tracker, timings, t0)
    problems = {display_name(k): v for k, v in tracker.problems().items()}
    if status == FAILED:
        raise _failure(run_name, run_dir, fit, files, tracker, problems)
    log.info("Time: data %.1fs, training %.1fs (tracker logging %.2fs), tracker start %.1fs, test evaluation %.1fs, "
             "final logging %.1fs + model %.1fs, tracker end %.1fs",
             timings["data_s"], timings["fit_s"], timings["epoch_logging_s"], timings["tracker_start_s"],
             timings["test_eval_s"], timings["report_upload_s"], timings["model_export_s"], timings["tracker_end_s"])
    log.log(logging.WARNING if problems else logging.INFO, "%s in %.1fs. Local files: %s. %s",
            final_word(run_name, status, tracker, problems), timings["total_s"], run_dir, tracker.describe())
    return RunResult(run_name, run_dir, status, fit, test_report, params, tags, artifacts, tracker, timings, record,
                     problems)


def _describe_run(cfg: dict[str, Any], data: CXRData) -> str:
    return (f"CustomCXRNet, config {cfg.get('config_name', '?')}: {cfg['training']['epochs']} epochs at "
            f"{cfg['data']['image_size']} px, {cfg['training']['optimizer']} lr {cfg['training']['lr']:g}, on {data.source} "
            f"data {data.fingerprint} ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test images).")


def dataset_lineage(data: CXRData) -> dict[str, Any]:
    """What the trackers record as the run's dataset inputs (plain values): see BaseTracker.log_dataset."""
    return {"name": f"cxr-{data.source}", "source": data.source, "fingerprint": data.fingerprint,
            "root": str(data.location.root), "test_split": data.test_split,
            # a retrain on all of train/ has no validation split
            "splits": {split: getattr(data, split).class_counts() for split in ("train", "val", "test")
                       if getattr(data, split) is not None}}


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def final_word(run_name: str, status: str, tracker: TrackerGroup, problems: dict[str, str]) -> str:
    """"Run x FINISHED" or "Run x FINISHED with 3 tracker errors (MLflow: the model and the final status not saved
    ...)": the terminal says what the stores hold."""
    if not problems:
        return f"Run {run_name} {status}"
    n = tracker.unsaved_count()
    return (f"Run {run_name} {status} with {n} tracker error{'s' if n != 1 else ''} "
            f"({'; '.join(f'{k}: {v}' for k, v in problems.items())})")


def _failure(run_name: str, run_dir: Path, fit: FitResult, files: RunFiles, tracker: TrackerGroup,
             problems: dict[str, str]) -> BaseException:
    """The exception a FAILED run ends with: its own paragraph for a non-finite loss, one paragraph saying what
    was lost and where the rest is for a full disk, the original exception for anything else."""
    kept = [f"the best checkpoint of epoch {fit.best_epoch} ({fit.checkpoint})"] if fit.best_epoch else []
    kept += [f"{display_name(t.name)}: {t.describe()}" for t in tracker.trackers]
    tail = (f" Kept: {'; '.join(kept)}." if kept else "") + (
        f" Trackers: {'; '.join(f'{k}: {v}' for k, v in problems.items())}." if problems else "")
    if isinstance(fit.error, CXRError):
        error = (type(fit.error) if isinstance(fit.error, RunFailedError) else RunFailedError)(f"{fit.error}{tail}")
        error.__cause__ = fit.error
        return error
    if files.lost:
        first, reason = next(iter(files.lost.items()))
        what = f"{reason} (writing {first})"
        return RunFailedError(
            f"Run {run_name} FAILED: {what}. Not saved in {run_dir}: {', '.join(files.lost)}; no partial file was left "
            f"in their place.{tail} Free space under {run_dir.parent} (or set output_dir elsewhere) and train again."
        )
    if fit.error is not None:
        log.error("%s.", final_word(run_name, FAILED, tracker, problems))
        return fit.error
    return RunFailedError(f"Run {run_name} FAILED.{tail}")


def _write_run_record(files: RunFiles, record: RunRecord, tracker: TrackerGroup, timings: dict[str, float], t0: float) -> None:
    """tracked.json (what the trackers were sent, with each backend's run reference) and timings.json."""
    timings["total_s"] = time.perf_counter() - t0
    record.extra = {**record.extra, "runs": {t.name: t.run_ref() for t in tracker.trackers},
                    "unsaved": {display_name(k): v for k, v in tracker.problems().items()}}
    files.text("tracked.json", record.to_json())
    files.text("timings.json", json.dumps({"trackers": tracker.names, **timings, "calls": tracker.call_summary()}, indent=2))


def _train_batch_montage(batch: torch.Tensor, data_cfg: dict[str, Any], path: Path) -> None:
    """One augmented training batch, as the model sees it (after the train transform)."""
    images = (denormalize(batch[:, 0], data_cfg) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(plots.image_montage(images)).save(path, format="PNG")


def _training_curves(fit: FitResult, cfg: dict[str, Any], path: Path) -> None:
    fig = plots.training_curves(fit.history, cfg["training"]["monitor"], fit.best_epoch)
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)


def _write_run_files(safe_cfg: dict[str, Any], fit: FitResult, files: RunFiles) -> dict[str, Path]:
    status = FAILED if fit.error is not None else fit.status
    history = files.text("history.json", json.dumps({
        "best_epoch": fit.best_epoch, "monitor": safe_cfg["training"]["monitor"], "best_score": fit.best_score,
        "status": status, "stopped_early": fit.stopped_early, "stop_reason": fit.stop_reason, "epochs": fit.history,
    }, indent=2))
    config = files.text("config.yaml", yaml.safe_dump(safe_cfg, sort_keys=False))
    return {name: path for name, path in (("history.json", history), ("config.yaml", config)) if path is not None}


def _final_evaluation(trainer: Trainer, data: CXRData, fit: FitResult, cfg, run_dir: Path) -> tuple[TestReport, dict[str, Path]]:
    """Evaluate the best checkpoint (not the last epoch) on the official test split."""
    trainer.model.load_state_dict(torch.load(fit.checkpoint, map_location=trainer.device, weights_only=True)["model_state"])
    report, paths = report_on_test(trainer.recipe.predictor(trainer.model), trainer.loaders["test"], data,
                                   trainer.criterion, trainer.device,
                                   run_dir, cfg["evaluation"]["n_prediction_images"])
    log.info("Test (best checkpoint, epoch %d): loss %.4f acc %.3f macro-F1 %.3f ROC-AUC %.3f",
             fit.best_epoch, report.loss, report.metrics["acc"], report.metrics["f1_macro"], report.metrics["roc_auc_ovr_macro"])
    return report, paths

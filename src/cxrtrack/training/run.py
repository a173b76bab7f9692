"""One experiment end to end: data -> model -> trainer -> test evaluation -> trackers.

``run_experiment(cfg)`` is what ``cxrtrack train`` calls. The same code path serves MLflow, W&B, both or none:
the tracker is built from its name and injected. It reads in the order it runs (after torchvision's
``references/classification/train.py``):

1. :func:`_prepare`: the data, the model, the run (its name, folder, config and tags: the run scaffold,
   :mod:`cxrtrack.training.scaffold`), the loaders and the trainer;
2. the trackers open the run; :func:`_before_training` logs the data's lineage and a batch as the model sees it;
3. ``Trainer.fit``: the epochs, each logged by :func:`_epoch_logger`;
4. :func:`_evaluate`: the run's files, the best checkpoint on the test split, the curves (no tracker involved);
5. :func:`_publish`: the test results and the model (``scaffold.publish_test``), the summary, images and files;
6. the final status, ``tracked.json`` and ``timings.json``; :func:`_finish` says how the run ended.

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
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from PIL import Image

from cxrtrack.data.dataset import CXRData, DataCache, skipped_report
from cxrtrack.data.loading import build_loaders, example_batch
from cxrtrack.data.transforms import denormalize
from cxrtrack.errors import CXRError, RunFailedError
from cxrtrack.models import build_model
from cxrtrack.tracking import FAILED, FINISHED, TrackerGroup, build_tracker
from cxrtrack.tracking.base import display_name
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training import plots
from cxrtrack.training.evaluate import TestReport, report_on_test
from cxrtrack.training.recipe import Recipe
from cxrtrack.training.resume import RUNS_FILE, ResumePoint, write_runs_file
from cxrtrack.training.scaffold import OpenRun, derived_config, load_data, open_run, publish_test
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
    problems: dict[str, str] = field(default_factory=dict)  # tracker -> what its store does not hold (yet)

    @property
    def complete(self) -> bool:
        """Every store holds everything the run sent."""
        return not self.problems


@dataclass
class _Experiment:
    """What :func:`_prepare` builds and the later steps use."""

    cfg: dict[str, Any]
    data: CXRData
    run: OpenRun
    trainer: Trainer


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
    t0 = time.perf_counter()
    seed_everything(cfg["seed"], cfg["training"]["deterministic"])
    device = select_device(cfg["device"])
    # Before the data: a bad tracker name fails at once (backends import their library lazily, so this is cheap).
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], cfg)
    exp = _prepare(cfg, data, device, tracker, callbacks, resume, t0)
    run = exp.run
    with tracker:
        run.start(tracker, group=group or cfg["tracking"]["group"], job_type=job_type, parents=parents,
                  description=description or _describe_run(cfg, exp.data),
                  resume=resume.tracker_ids() if resume is not None else None)
        _before_training(exp, tracker)
        with timed(run.timings, "fit_s"):
            fit = exp.trainer.fit()
        if isinstance(fit.error, OSError) and fit.unsaved is not None:  # a checkpoint not written (a full disk)
            path, epoch = fit.unsaved
            run.files.lost_file(f"{path.relative_to(run.dir).as_posix()} of epoch {epoch}", fit.error)
        with timed(run.timings, "test_eval_s"):  # evaluation and files on disk: no tracker involved
            test = _evaluate(exp, fit)
        _publish(exp, tracker, fit, test)
        # The run's own record lost on a full disk is a failed run, whatever training did.
        status = FAILED if fit.error is not None or (run.files.lost and fit.status == FINISHED) else fit.status
        run.end(tracker, status)
    run.write_record(tracker)
    return _finish(exp, tracker, fit, test[0] if test is not None else None, status)


def _prepare(cfg: dict[str, Any], data: CXRData | DataCache | None, device: torch.device, tracker: TrackerGroup,
             callbacks: tuple[EpochCallback, ...], resume: ResumePoint | None, t0: float) -> _Experiment:
    """The data (decoded once, or taken from the caller's cache), the model, the run, the loaders and the trainer."""
    timings: dict[str, float] = {"epoch_logging_s": 0.0, "model_export_s": 0.0}
    data = load_data(cfg, data, timings)
    model = build_model(cfg["model"], cfg["data"])
    if resume is not None:
        _check_resume(resume, data)
    summary = data.summary()
    run = open_run(cfg, derived_config(cfg, summary, model.num_parameters(), device), device=device.type, data=data,
                   at=(resume.run_name, resume.run_dir) if resume is not None else None, t0=t0, timings=timings)
    log.info("Run %s: CustomCXRNet with %s parameters on %s; tracking: %s",
             run.name, f"{model.num_parameters():,}", device, ", ".join(tracker.names) or "none")

    loaders = build_loaders(data, cfg, device)  # DataLoaders, or batches cut on the device (data.pipeline)
    checkpoint_extra = {
        "class_names": list(data.class_names),
        "config": run.safe_cfg,
        "dataset": {k: v for k, v in summary.items() if k in ("source", "fingerprint", "root", "layout")},
        "run_name": run.name,
    }
    trainer = Trainer(model, loaders, cfg["training"], device, run.dir / "checkpoints" / "best.pt",
                      checkpoint_extra, build_criterion(cfg["training"], data.train.labels, device),
                      callbacks=callbacks, recipe=Recipe(cfg, len(data.class_names)),
                      loggers=(_epoch_logger(tracker, run),))  # the trackers get each epoch before any file of it
    if resume is not None:
        trainer.resume_from = resume.state
    return _Experiment(cfg, data, run, trainer)


def _check_resume(resume: ResumePoint, data: CXRData) -> None:
    trained_on = (resume.state.get("dataset") or {}).get("fingerprint")
    if trained_on and trained_on != data.fingerprint:
        raise CXRError(f"{resume.run_name} was trained on data with fingerprint {trained_on}; the data found now "
                       f"({data.location.root}) has fingerprint {data.fingerprint}. A run resumes on the same data "
                       f"only: point DATA= at it, or start a new run.")
    log.info("Resuming %s after epoch %d in %s (tracked runs: %s).", resume.run_name, resume.epoch, resume.run_dir,
             ", ".join(f"{display_name(k)} {v}" for k, v in resume.tracker_ids().items()) or "none")


def _epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """One epoch's row as the trackers get it."""
    metrics = {k: v for k, v in row.items() if k != "epoch"}
    if row.get("lr", 0) > 0:  # MLflow draws a constant lr of 0.001 as a flat line labelled 0; -3 reads as 1e-3
        metrics["log10_lr"] = math.log10(row["lr"])
    return metrics


def _epoch_logger(tracker: TrackerGroup, run: OpenRun) -> EpochCallback:
    """The trackers' epoch callback (the trainer knows nothing about trackers)."""

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        with timed(run.timings, "epoch_logging_s"):
            tracker.log_metrics(_epoch_metrics(row), step=epoch)

    return log_epoch


def _before_training(exp: _Experiment, tracker: TrackerGroup) -> None:
    """Where the tracked runs are (--resume), a resumed run's earlier epochs, the data's lineage, a batch, skipped
    files."""
    run, data = exp.run, exp.data
    try:  # tracked.json is only written at the end
        write_runs_file(run.dir, run.name, {t.name: t.run_ref() for t in tracker.trackers})
    except OSError as exc:
        run.files.lost_file(RUNS_FILE, exc)
    for row in (exp.trainer.resume_from or {}).get("history", []):  # in the stores already: into the record only
        tracker.record_only("log_metrics", _epoch_metrics(row), int(row["epoch"]))
    tracker.log_dataset(dataset_lineage(data))
    name = "samples/train_batch_augmented.png"
    montage = run.files.write(name, lambda tmp: _train_batch_montage(example_batch(data, exp.trainer.loaders),
                                                                     exp.cfg["data"], tmp))
    if montage is not None:
        tracker.log_image(montage, name, caption="augmented training images as the model sees them")
    if data.skipped:
        run.save("skipped_files.txt", skipped_report(data.skipped), "data/skipped_files.txt")  # escaped: one line each


def _evaluate(exp: _Experiment, fit: FitResult) -> tuple[TestReport, dict[str, Path]] | None:
    """The run's files (history, config), the best epoch's numbers, the best checkpoint on the official test split
    (a finished run with a test split only) and the training curves."""
    run, cfg = exp.run, exp.cfg
    run.save("history.json", json.dumps({
        "best_epoch": fit.best_epoch, "monitor": cfg["training"]["monitor"], "best_score": fit.best_score,
        "status": FAILED if fit.error is not None else fit.status, "stopped_early": fit.stopped_early,
        "stop_reason": fit.stop_reason, "epochs": fit.history}, indent=2))
    run.save_config()
    test = None
    if fit.best_epoch is not None:
        run.artifacts["checkpoints/best.pt"] = fit.checkpoint
        run.summary.update({"best_epoch": fit.best_epoch, **{f"best_{k}": v for k, v in fit.best_metrics.items()},
                            "epochs_completed": len(fit.history)})
        if fit.status == FINISHED and cfg["evaluation"]["run_test"] and len(exp.data.test) and not run.files.lost:
            try:
                test = _final_evaluation(exp.trainer, exp.data, fit, cfg, run.dir)
            except OSError as exc:
                run.files.lost_file("reports/ and plots/ of the test evaluation", exc)
    if fit.history:
        curves = run.files.write("plots/training_curves.png", lambda tmp: _training_curves(fit, cfg, tmp))
        if curves is not None:
            run.images["plots/training_curves.png"] = curves
    return test


def _publish(exp: _Experiment, tracker: TrackerGroup, fit: FitResult,
             test: tuple[TestReport, dict[str, Path]] | None) -> None:
    """The test results and the model, then the summary, images and files."""
    if test is not None:
        trainer = exp.trainer  # its model holds the best checkpoint (_final_evaluation loaded it)
        # the model as it predicted the test split: the checkpointed weights, with TTA when evaluation.tta asks
        publish_test(exp.run, tracker, exp.cfg, exp.data, *test, trainer.recipe.predictor(trainer.model),
                     fit.checkpoint, trainer.loaders["test"], {"best_epoch": fit.best_epoch,
                                                               "image_size": exp.data.image_size})
    exp.run.publish(tracker)


def _finish(exp: _Experiment, tracker: TrackerGroup, fit: FitResult, test: TestReport | None, status: str) -> RunResult:
    """A FAILED run raises (see run_experiment); any other says its time and last line, and returns its result."""
    run, timings = exp.run, exp.run.timings
    problems = {display_name(k): v for k, v in tracker.problems().items()}
    if status == FAILED:
        raise _failure(run, fit, tracker, problems)
    log.info("Time: data %.1fs, training %.1fs (tracker logging %.2fs), tracker start %.1fs, test evaluation %.1fs, "
             "final logging %.1fs + model %.1fs, tracker end %.1fs",
             timings["data_s"], timings["fit_s"], timings["epoch_logging_s"], timings["tracker_start_s"],
             timings["test_eval_s"], timings["report_upload_s"], timings["model_export_s"], timings["tracker_end_s"])
    log.log(logging.WARNING if problems else logging.INFO, "%s in %.1fs. Local files: %s. %s",
            final_word(run.name, status, tracker, problems), timings["total_s"], run.dir, tracker.describe())
    return RunResult(run.name, run.dir, status, fit, test, tracker.record.params, run.tags, run.artifacts, tracker,
                     timings, tracker.record, problems)


def _describe_run(cfg: dict[str, Any], data: CXRData) -> str:
    n_val = len(data.val) if data.val is not None else 0
    return (f"CustomCXRNet, config {cfg.get('config_name', '?')}: {cfg['training']['epochs']} epochs at "
            f"{cfg['data']['image_size']} px, {cfg['training']['optimizer']} lr {cfg['training']['lr']:g}, "
            f"on {data.source} data {data.fingerprint} ({len(data.train)} train / {n_val} val / "
            f"{len(data.test)} test images).")


def dataset_lineage(data: CXRData) -> dict[str, Any]:
    """What the trackers record as the run's dataset inputs (plain values): see BaseTracker.log_dataset."""
    return {"name": f"cxr-{data.source}", "source": data.source, "fingerprint": data.fingerprint,
            "root": str(data.location.root), "test_split": data.test_split,
            # a retrain on all of train/ has no validation split
            "splits": {split: getattr(data, split).class_counts() for split in ("train", "val", "test")
                       if getattr(data, split) is not None}}


def final_word(run_name: str, status: str, tracker: TrackerGroup, problems: dict[str, str]) -> str:
    """"Run x FINISHED" or "Run x FINISHED with 3 tracker errors (MLflow: the model and the final status not saved
    ...)": the terminal says what the stores hold."""
    if not problems:
        return f"Run {run_name} {status}"
    n = tracker.unsaved_count()
    return (f"Run {run_name} {status} with {n} tracker error{'s' if n != 1 else ''} "
            f"({'; '.join(f'{k}: {v}' for k, v in problems.items())})")


def _failure(run: OpenRun, fit: FitResult, tracker: TrackerGroup, problems: dict[str, str]) -> BaseException:
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
    if run.files.lost:
        first, reason = next(iter(run.files.lost.items()))
        what = f"{reason} (writing {first})"
        return RunFailedError(
            f"Run {run.name} FAILED: {what}. Not saved in {run.dir}: {', '.join(run.files.lost)}; no partial file was "
            f"left in their place.{tail} Free space under {run.dir.parent} (or set output_dir elsewhere) and train "
            f"again."
        )
    if fit.error is not None:
        log.error("%s.", final_word(run.name, FAILED, tracker, problems))
        return fit.error
    return RunFailedError(f"Run {run.name} FAILED.{tail}")


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


def _final_evaluation(trainer: Trainer, data: CXRData, fit: FitResult, cfg,
                      run_dir: Path) -> tuple[TestReport, dict[str, Path]]:
    """Evaluate the best checkpoint (not the last epoch) on the official test split."""
    state = torch.load(fit.checkpoint, map_location=trainer.device, weights_only=True)
    trainer.model.load_state_dict(state["model_state"])
    report, paths = report_on_test(trainer.recipe.predictor(trainer.model), trainer.loaders["test"], data,
                                   trainer.criterion, trainer.device,
                                   run_dir, cfg["evaluation"]["n_prediction_images"])
    log.info("Test (best checkpoint, epoch %d): loss %.4f acc %.3f macro-F1 %.3f ROC-AUC %.3f",
             fit.best_epoch, report.loss, report.metrics["acc"], report.metrics["f1_macro"],
             report.metrics["roc_auc_ovr_macro"])
    return report, paths

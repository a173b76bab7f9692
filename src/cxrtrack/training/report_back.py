"""`make evaluate` reports back: the results go to the MLflow run and the W&B run that trained the model.

Keyed by the fingerprint of the evaluated data, so evaluating on other data, or again, adds a row instead of
replacing what was there:

- MLflow: metrics ``eval/<fingerprint8>/<metric>`` (one point per evaluation; a re-evaluation adds a step), a
  table artifact ``evaluations/<fingerprint>.json`` (one row per evaluation, appended) and the report files under
  ``evaluations/<fingerprint>/``; the run's status is left as it was.
- W&B: the run is resumed (``resume="allow"`` with its id; offline this writes a new offline folder with the same
  run id, which `make wandb-sync` appends to the run) and its summary gets ``eval/<fingerprint8>/<metric>``.

A tracker that cannot be reached is reported in one line; the evaluation itself is never lost (its folder). The
runs are reached through the tracker package (:func:`cxrtrack.tracking.attached`): this module imports no client.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cxrtrack.tracking import attached
from cxrtrack.training.evaluate import TestReport, evaluate_checkpoint

log = logging.getLogger(__name__)

KEY_METRICS = ("loss", "acc", "f1_macro", "roc_auc_ovr_macro")


def eval_metrics(report: TestReport) -> dict[str, float]:
    fp = report.data["fingerprint"][:8]
    values = {"loss": report.loss, **report.metrics}
    return {f"eval/{fp}/{k}": float(values[k]) for k in KEY_METRICS if k in values}


def find_tracked_runs(checkpoint: Path, origin: dict[str, Any], run_name: str | None) -> dict[str, dict[str, Any]]:
    """backend -> run reference of the runs that trained the model: from the reference itself (an MLflow run or
    registered version) and from the run's ``tracked.json`` beside its checkpoint (outputs/<run>/)."""
    runs: dict[str, dict[str, Any]] = {}
    from cxrtrack.config import RUN_NAME_PATTERN

    candidates = [checkpoint.resolve().parent.parent / "tracked.json"]
    if run_name and RUN_NAME_PATTERN.fullmatch(run_name):  # a checkpoint's name never leads outside outputs/
        candidates.append(Path("outputs") / run_name / "tracked.json")
    for path in candidates:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("name") not in (None, run_name) and run_name:
            continue
        for backend, ref in (record.get("extra", {}).get("runs") or {}).items():
            if ref and ref.get("run_id"):
                runs.setdefault(backend, ref)
        break
    if origin.get("kind") in ("mlflow-model", "mlflow-run") and origin.get("run_id"):
        runs["mlflow"] = {"run_id": origin["run_id"], "tracking_uri": origin.get("tracking_uri")}
    return runs


def report_to_mlflow(ref: dict[str, Any], report: TestReport, out: Path, tracking_uri: str | None) -> str:
    fp = report.data["fingerprint"]
    metrics = eval_metrics(report)
    with attached("mlflow", ref, tracking_uri=tracking_uri) as run:
        from cxrtrack.tracking.mlflow_tracker import MLflowTracker  # imported by attached: free here

        if not isinstance(run, MLflowTracker):
            raise TypeError(f"attached('mlflow') gave a {type(run).__name__}")
        step = run.last_step(next(iter(metrics))) + 1  # a re-evaluation adds a point, never replaces one
        run.log_metrics(metrics, step, timestamp_ms=int(time.time() * 1000))
        row = {"evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S"), "data_fingerprint": fp,
               "data_source": report.data["source"], "data_root": report.data["root"], "n_test": report.data["n_test"],
               "trained_on": report.data.get("trained_on"), **{k.rsplit("/", 1)[1]: v for k, v in metrics.items()},
               "report_folder": str(out)}
        run.log_table(f"evaluations/{fp}", [row])  # appended to the table of earlier evaluations
        for path in sorted(out.glob("*")):
            if path.is_file():
                run.log_artifact(path, f"evaluations/{fp}")
        run.set_tags({f"eval.{fp[:8]}.last": row["evaluated_at"]})
    return f"MLflow run {ref['run_id']}: metrics {', '.join(metrics)} (step {step}) and evaluations/{fp}.json"


def report_to_wandb(ref: dict[str, Any], report: TestReport) -> str:
    metrics = eval_metrics(report)
    with attached("wandb", ref, job_type="evaluation") as run:
        from cxrtrack.tracking.wandb_tracker import WandbTracker  # imported by attached: free here

        if not isinstance(run, WandbTracker):
            raise TypeError(f"attached('wandb') gave a {type(run).__name__}")
        fingerprint = report.data["fingerprint"]
        run.log_summary({**metrics, f"eval/{fingerprint[:8]}/data_fingerprint": fingerprint})
        mode, new_dir = run.mode, run.run_dir
    how = ("offline: a new offline folder with the same run id, appended to the run by `make wandb-sync`"
           if mode == "offline" else "the run was resumed")
    return f"W&B run {ref['run_id']}: summary {', '.join(metrics)} ({how}: {new_dir})"


def evaluate_and_report(checkpoint: str | Path, origin: dict[str, Any], data_path: str | None, out_dir: str | None,
                        tracking_uri: str | None, report_back: bool = True) -> tuple[TestReport, Path, list[str]]:
    """Evaluate, write the report folder, and log the results back to the runs that trained the model."""
    report, out = evaluate_checkpoint(checkpoint, data_path, out_dir)
    told: list[str] = []
    if not report_back:
        return report, out, told
    runs = find_tracked_runs(Path(checkpoint), origin, report.data.get("run_name"))
    senders = {"mlflow": lambda ref: report_to_mlflow(ref, report, out, tracking_uri),
               "wandb": lambda ref: report_to_wandb(ref, report)}
    for backend, ref in runs.items():
        if backend not in senders:
            continue
        try:
            told.append("Logged back to " + senders[backend](ref))
        except Exception as exc:  # noqa: BLE001 - the evaluation is in its folder whatever a tracker does
            told.append(f"Could not log the results back to the {backend} run {ref.get('run_id')} "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); they are in {out}.")
    if not runs:
        told.append("No tracked run found for this model (no tracked.json beside the checkpoint): results only in "
                    f"{out}.")
    return report, out, told

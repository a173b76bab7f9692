"""Final evaluation on the test split: metrics, report, figures and predictions.

Used at the end of training (on the best checkpoint) and by ``scripts/evaluate.py`` for any saved
checkpoint or tracked run.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from cxrtrack.config import RUN_NAME_PATTERN, validate, with_defaults
from cxrtrack.data.dataset import CXRData, build_data, slug
from cxrtrack.errors import ConfigError, CXRError
from cxrtrack.models.checkpoint import model_from_checkpoint
from cxrtrack.models.ensemble import with_tta
from cxrtrack.tracking import Predictions
from cxrtrack.tracking.fetch import missing_checkpoint
from cxrtrack.training import plots
from cxrtrack.training.metrics import classification_metrics, confusion, report_text
from cxrtrack.training.trainer import EvalOutput, build_criterion, evaluate_model
from cxrtrack.utils import atomic_write, select_device, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class TestReport:
    metrics: dict[str, float]  # keys without the "test/" prefix
    confusion: np.ndarray
    report: str
    predictions: Predictions
    loss: float
    data: dict[str, Any] = field(default_factory=dict)  # what was evaluated: source, fingerprint, root, counts

    def tracked_metrics(self) -> dict[str, float]:
        return {"test/loss": self.loss, **{f"test/{k}": v for k, v in self.metrics.items()}}

    def figures(self) -> dict[str, Any]:
        """name -> matplotlib Figure (close them after use)."""
        p = self.predictions
        n = min(len(p.y_true), p.extra.get("n_grid", 16))
        aucs = {name: self.metrics[f"roc_auc_{slug(name)}"] for name in p.class_names}
        captions = [(p.class_names[t], p.class_names[q], p.probs[i, q])
                    for i, (t, q) in enumerate(zip(p.y_true, p.y_pred, strict=True))]
        return {
            "confusion_matrix.png": plots.confusion_matrix_figure(self.confusion, p.class_names),
            "roc_curves.png": plots.roc_figure(p.y_true, p.probs, p.class_names, aucs),
            "test_predictions.png": plots.prediction_grid(p.images[:n], captions[:n]),
        }


def build_report(output: EvalOutput, data: CXRData, n_grid: int = 16) -> TestReport:
    split = data.test.split
    images = split.images[:, 0].numpy()  # the cached uint8 model input, before normalisation
    predictions = Predictions(
        class_names=data.class_names,
        y_true=output.y_true,
        y_pred=output.y_pred,
        probs=output.probs,
        paths=[str(p) for p in split.paths],
        images=images,
        extra={"n_grid": n_grid},
    )
    return TestReport(
        metrics=classification_metrics(output.y_true, output.y_pred, output.probs, data.class_names),
        confusion=confusion(output.y_true, output.y_pred, len(data.class_names)),
        report=report_text(output.y_true, output.y_pred, data.class_names),
        predictions=predictions,
        loss=output.loss,
    )


def write_report(report: TestReport, out_dir: Path, figures: dict[str, Any]) -> dict[str, Path]:
    """Write test_metrics.json, classification_report.txt, test_predictions.csv and ``figures``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "test_metrics.json",
        "report": out_dir / "classification_report.txt",
        "predictions": out_dir / "test_predictions.csv",
    }
    write_text_atomic(paths["metrics"], json.dumps(report.tracked_metrics(), indent=2, allow_nan=True))
    cm = "\n".join("  ".join(f"{v:4d}" for v in row) for row in report.confusion)
    write_text_atomic(paths["report"], f"{report.report}\nConfusion matrix (rows: true, columns: predicted)\n{cm}\n")
    p = report.predictions
    lines = ["path,true,pred," + ",".join(f"p_{slug(c)}" for c in p.class_names)]
    for i in range(len(p.y_true)):
        probs = ",".join(f"{v:.6f}" for v in p.probs[i])
        lines.append(f"\"{p.paths[i]}\",{p.class_names[p.y_true[i]]},{p.class_names[p.y_pred[i]]},{probs}")
    write_text_atomic(paths["predictions"], "\n".join(lines) + "\n")
    for name, fig in figures.items():
        paths[name] = atomic_write(out_dir / "plots" / name, functools.partial(_save_png, fig))
    return paths


def _save_png(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, format="png")


def report_on_test(model: torch.nn.Module, loader, data: CXRData, criterion: torch.nn.Module, device: torch.device,
                   out_dir: Path, n_grid: int = 16) -> tuple[TestReport, dict[str, Path]]:
    """Evaluate ``model`` on the test split and write the report files and figures into ``out_dir``."""
    report = build_report(evaluate_model(model, loader, device, criterion), data, n_grid)
    figures = report.figures()
    try:
        paths = write_report(report, out_dir, figures)
    finally:
        for fig in figures.values():
            plt.close(fig)
    return report, paths


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint written by training: a CustomCXRNet, or the :class:`Ensemble` of a
    cross-validation's fold models (``kind: ensemble``, see ``selection/cv.py``)."""
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # plain types only: safe to load
        model = model_from_checkpoint(ckpt)
    except (KeyError, TypeError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CXRError(f"{path} is not a CustomCXRNet checkpoint written by this project "
                       f"({type(exc).__name__}: {exc}).") from None
    return model.to(device).eval(), ckpt


def default_eval_dir(ckpt: dict[str, Any], checkpoint: str | Path, fingerprint: str | None = None) -> Path:
    """``outputs/eval-<run name>-<data fingerprint>`` under the current project: never the folder a checkpoint says (a
    checkpoint from elsewhere, or altered, must not choose where files are written). A folder of an earlier
    evaluation is never overwritten: the new one gets a ``-2``, ``-3``, ... suffix."""
    name = str(ckpt.get("run_name") or Path(checkpoint).stem)
    if not RUN_NAME_PATTERN.fullmatch(name):
        name = re.sub(r"[^\w.+=@,-]", "_", name).lstrip("._-")[:128] or "checkpoint"
    base = Path("outputs") / (f"eval-{name}-{fingerprint[:8]}" if fingerprint else f"eval-{name}")
    for n in range(1, 1000):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not out.exists():
            return out
    return base


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | None = None, out_dir: str | Path | None = None,
                        device: str = "auto") -> tuple[TestReport, Path]:
    """Evaluate a saved checkpoint on the test split of ``data_path``.

    Without ``data_path`` the data the model was trained on is used (the folder recorded in the
    checkpoint), and it must still have the same content fingerprint.
    """
    dev = select_device(device)
    model, ckpt = load_checkpoint(checkpoint, dev)
    try:
        cfg = with_defaults(copy.deepcopy(ckpt["config"]))
        validate(cfg)  # a checkpoint is input too: its settings are checked like a config file's
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CXRError(f"{checkpoint} holds settings this project cannot use ({exc}); it was not written by this "
                       f"version of cxrtrack, or it was altered.") from None
    trained_on = ckpt.get("dataset", {})
    cfg["data"]["path"] = data_path or trained_on.get("root") or cfg["data"]["path"]
    data = build_data(cfg["data"], cfg["seed"])
    if trained_on.get("fingerprint") and trained_on["fingerprint"] != data.fingerprint:
        message = (f"the checkpoint was trained on data with fingerprint {trained_on['fingerprint']} "
                   f"({trained_on.get('root')}); {data.location.root} has fingerprint {data.fingerprint}")
        if not data_path:
            raise CXRError(f"The training data has changed since this model was trained: {message}. Pass DATA=<folder> "
                           f"(--data) to evaluate on other data on purpose.")
        log.warning("Evaluating on other data than the model was trained on: %s.", message)
    # the loss as training reported it: class weights from the images the model was trained on (all of train/
    # after a cross-validation), label smoothing; the model predicts as it did then (flip TTA if it used it)
    cv = cfg["training"]["cv_folds"] > 1
    labels = data.train.labels + (data.val.labels if cv and data.val is not None else [])
    criterion = build_criterion(cfg["training"], labels, dev)
    model = with_tta(model, cfg["evaluation"]["tta"])
    out = Path(out_dir) if out_dir else default_eval_dir(ckpt, checkpoint, data.fingerprint)
    report, _ = report_on_test(model, data.loaders(cfg["data"]["batch_size"])["test"], data, criterion, dev, out,
                               cfg["evaluation"]["n_prediction_images"])
    report.data = {"source": data.source, "fingerprint": data.fingerprint, "root": str(data.location.root),
                   "n_test": len(data.test), "trained_on": trained_on.get("fingerprint"),
                   "run_name": ckpt.get("run_name")}
    return report, out

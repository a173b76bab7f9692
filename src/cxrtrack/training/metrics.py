"""Classification metrics, all computed by scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cxrtrack.data.dataset import slug


def epoch_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The per-epoch pair: accuracy and macro F1 (over all classes, absent ones count as 0)."""
    labels = list(range(3))
    return {
        "acc": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def recall_per_class(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    """``recall_<class>`` for every class: the fraction of its images predicted as it
    (NaN for a class with no image)."""
    labels = list(range(len(class_names)))
    _, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    return {f"recall_{slug(name)}": float(r) for name, r in zip(class_names, recall, strict=True)}


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """Accuracy, macro and per-class precision/recall/F1, one-vs-rest ROC-AUC (macro and per class).

    ROC-AUC is NaN for a class absent from ``y_true`` (it is undefined there), never a made-up value.
    """
    labels = list(range(len(class_names)))
    out: dict[str, float] = {"acc": float(accuracy_score(y_true, y_pred))}
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    out.update(precision_macro=float(p), recall_macro=float(r), f1_macro=float(f))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    aucs = []
    for i, name in enumerate(class_names):
        key = slug(name)
        out[f"precision_{key}"], out[f"recall_{key}"], out[f"f1_{key}"] = float(p[i]), float(r[i]), float(f[i])
        positives = y_true == i
        if positives.any() and not positives.all():
            auc = float(roc_auc_score(positives.astype(int), probs[:, i]))
        else:
            auc = float("nan")
        out[f"roc_auc_{key}"] = auc
        aucs.append(auc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["roc_auc_ovr_macro"] = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def report_text(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> str:
    return classification_report(
        y_true, y_pred, labels=list(range(len(class_names))), target_names=list(class_names), digits=4, zero_division=0
    )

"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrtrack import CLASS_NAMES
from cxrtrack.training.metrics import classification_metrics, confusion, epoch_metrics


def test_hand_computed_example():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    probs = np.eye(3)[y_pred] * 0.8 + 0.2 / 3
    m = classification_metrics(y_true, y_pred, probs, CLASS_NAMES)
    assert m["acc"] == pytest.approx(6 / 8)
    # COVID-19: P=3/3 R=3/4; Normal: P=1/2 R=1/2; Viral: P=2/3 R=2/2
    assert m["precision_covid19"] == pytest.approx(1.0) and m["recall_covid19"] == pytest.approx(0.75)
    assert m["f1_normal"] == pytest.approx(0.5)
    assert m["f1_viral_pneumonia"] == pytest.approx(0.8)
    assert m["f1_macro"] == pytest.approx((6 / 7 + 0.5 + 0.8) / 3)
    assert confusion(y_true, y_pred).tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert epoch_metrics(y_true, y_pred)["f1_macro"] == pytest.approx(m["f1_macro"])


def test_perfect_scores_and_auc():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = classification_metrics(y, y, probs, CLASS_NAMES)
    assert m["acc"] == m["f1_macro"] == m["roc_auc_ovr_macro"] == 1.0


def test_auc_of_an_absent_class_is_nan_not_invented():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    m = classification_metrics(y_true, probs.argmax(1), probs, CLASS_NAMES)
    assert math.isnan(m["roc_auc_viral_pneumonia"])
    assert m["roc_auc_covid19"] == 1.0
    assert m["roc_auc_ovr_macro"] == pytest.approx(1.0)  # the mean over the defined ones

"""Figures for a run: training curves, confusion matrix, ROC curves, a grid of test predictions.

Every function returns a matplotlib Figure (the caller saves it and hands it to the trackers).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from sklearn.metrics import roc_curve


def training_curves(history: list[dict[str, float]], monitor: str | None = None, best_epoch: int | None = None):
    epochs = [row["epoch"] for row in history]
    panels = [("loss", "Loss"), ("acc", "Accuracy"), ("f1_macro", "Macro F1")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, panels, strict=False):
        for split, style in (("train", "-o"), ("val", "-s")):
            if f"{split}/{key}" not in history[0]:
                continue  # no validation split (a retrain on all of train/)
            ax.plot(epochs, [row[f"{split}/{key}"] for row in history], style, label=split, markersize=3)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[3].plot(epochs, [row["lr"] for row in history], "-o", markersize=3, color="tab:green")
    axes[3].set(title="Learning rate", xlabel="epoch", yscale="log")
    axes[3].grid(alpha=0.3)
    if best_epoch is not None:
        for ax in axes:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
        fig.suptitle(f"best epoch {best_epoch}" + (f" by {monitor}" if monitor else ""))
    # fixed margins, not fig.tight_layout(): it draws the figure once more to measure it (~0.1-0.3 s of every run's
    # end here, docs/speed.md); the panels' labels are short and fixed, so these margins always fit them
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.13, top=0.86 if best_epoch is not None else 0.92, wspace=0.2)
    return fig


def confusion_matrix_figure(cm: np.ndarray, class_names: tuple[str, ...], title: str = "Test confusion matrix"):
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", xticklabels=class_names, yticklabels=class_names, ax=ax,
                cbar=False)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], aucs: dict[str, float]):
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, name in enumerate(class_names):
        positives = y_true == i
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives.astype(int), probs[:, i])
            ax.plot(fpr, tpr, label=f"{name} (AUC {aucs.get(name, float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Test ROC (one-vs-rest)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def prediction_grid(images: np.ndarray, captions: list[tuple[str, str, float]], ncols: int = 4):
    """``captions``: (true name, predicted name, predicted probability) per image; wrong ones in red."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, (true, pred, p) in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {true}\npred: {pred} ({p:.0%})", fontsize=9, color="green" if true == pred else "red")
    # fixed margins (axes without ticks, two-line titles of fixed size) instead of tight_layout's extra draw
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (3.2 * nrows), wspace=0.05,
                        hspace=0.45 / 2.7)
    return fig


def image_montage(images: np.ndarray, ncols: int = 8) -> np.ndarray:
    """(N, H, W) uint8 -> one (rows*H, ncols*W) uint8 image."""
    n, h, w = images.shape
    nrows = int(np.ceil(n / ncols))
    canvas = np.zeros((nrows * h, ncols * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return canvas

"""The evaluate stage's pictures: confusion matrix, worst mistakes, curves, reliability."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from convpipe.io import atomic_path

if TYPE_CHECKING:
    pass


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Confusion matrix ``(K, K)`` (rows true, columns predicted) with counts in the cells."""
    k = len(class_names)
    size = max(4.0, 0.5 * k + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if k <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > threshold else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    return fig


def plot_misclassified(
    images: np.ndarray,
    labels: Sequence[int],
    preds: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    heat: np.ndarray | None = None,
) -> Figure:
    """A grid of uint8 images ``(N, H, W, C)`` titled ``true → predicted (confidence)``.

    With ``heat`` (``(N, H, W)`` in ``[0, 1]``, e.g. Grad-CAM maps), each image carries its map
    as a translucent overlay: where the evidence for the predicted class was.
    """
    n = max(len(images), 1)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    # constrained layout leaves room for each image's two-line title and the figure's title
    fig = Figure(figsize=(max(1.8 * cols, 4.5), 2.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    maps = heat if heat is not None else [None] * len(images)
    rows_of = zip(axes.flat, images, labels, preds, confidence, maps, strict=False)
    for ax, image, y, p, c, m in rows_of:
        shown = image[..., 0] if image.shape[-1] == 1 else image
        ax.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, interpolation="nearest")
        if m is not None:
            ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(
            f"{class_names[y]} → {class_names[p]}\n({c:.2f})", fontsize=8, color="firebrick"
        )
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    title = "Worst mistakes: true → predicted (confidence)"
    if heat is not None:
        title = "Grad-CAM of the predicted class\non the worst mistakes: true → predicted"
    fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(history: Sequence[dict[str, str]]) -> Figure:
    """Loss and accuracy per epoch, train beside val, from the train stage's history rows."""
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [int(row["epoch"]) for row in history]
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split in ("train", "val"):
            values = [
                float(row[f"{split}/{metric}"]) if row.get(f"{split}/{metric}") else np.nan
                for row in history
            ]
            ax.plot(epochs, values, marker="o", markersize=3, label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_reliability(
    rows: Sequence[dict[str, float]], ece: float, temperature: float = 1.0
) -> Figure:
    """The reliability diagram: accuracy against confidence per bin, the diagonal, the counts."""
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    confidence = [row["confidence"] for row in rows]
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="calibrated")
    top.plot(confidence, [row["accuracy"] for row in rows], marker="o", label="model")
    scaled = f", logits / {temperature:.4g}" if temperature != 1.0 else ""
    title = f"Reliability (ECE {ece:.4f}{scaled})"
    top.set(ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(confidence, [row["count"] for row in rows], width=1 / 30, color="steelblue")
    bottom.set(xlabel="confidence (top class)", ylabel="images")
    fig.tight_layout()
    return fig


def plot_class_curves(
    roc: Sequence[dict[str, Any]], pr: Sequence[dict[str, Any]], auroc: float
) -> Figure:
    """Per-class one-vs-rest ROC and precision-recall curves, side by side."""
    fig = Figure(figsize=(11, 5))
    roc_ax, pr_ax = fig.subplots(1, 2)
    names = list(dict.fromkeys(row["class"] for row in roc))
    for name in names:
        mine = [row for row in roc if row["class"] == name]
        roc_ax.plot([r["fpr"] for r in mine], [r["tpr"] for r in mine], label=name)
        mine = [row for row in pr if row["class"] == name]
        pr_ax.plot([r["recall"] for r in mine], [r["precision"] for r in mine], label=name)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="gray")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate")
    roc_ax.set_title(f"ROC, one class against the rest (macro AUROC {auroc:.4f})", fontsize=10)
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, one against the rest")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
    roc_ax.legend(fontsize=7, loc="lower right", ncol=2 if len(names) > 6 else 1)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Save ``fig`` as PNG atomically (Figure without pyplot: no display, nothing to close)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)

"""Test-split metrics from logits and labels: accuracy, per-class scores, AUROC, top-k."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional import classification as tmf

#: Top-k accuracy is reported from this many classes on: with fewer, the true class is among
#: any model's top k most of the time and the figure says little.
TOP_K_MIN_CLASSES = 6


def test_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean data loss: BCE with logits for 2 classes (``(N,)`` logits), else cross-entropy."""
    if logits.ndim == 1:
        return float(F.binary_cross_entropy_with_logits(logits, labels.float()))
    return float(F.cross_entropy(logits, labels))


def compute_metrics(
    probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], top_k: int
) -> dict[str, Any]:
    """Test metrics from class probabilities.

    Args:
        probs: ``(N, K)`` probabilities.
        labels: ``(N,)`` int64 true classes.
        class_names: the K class names, in label order.
        top_k: k of the top-k accuracy, reported only for K >= :data:`TOP_K_MIN_CLASSES`.

    Returns:
        accuracy, macro precision/recall/F1, macro one-vs-rest AUROC, optional top-k accuracy,
        per-class precision/recall/F1/support, and the number of test images.
    """
    k = len(class_names)
    preds = probs.argmax(dim=1)
    common: dict[str, Any] = {"num_classes": k}
    out: dict[str, Any] = {  # headline first: ``dvc exp show`` keeps this column order
        "accuracy": float((preds == labels).float().mean()),
        "precision_macro": float(
            tmf.multiclass_precision(preds, labels, average="macro", **common)
        ),
        "recall_macro": float(tmf.multiclass_recall(preds, labels, average="macro", **common)),
        "f1_macro": float(tmf.multiclass_f1_score(preds, labels, average="macro", **common)),
        "auroc_macro": _auroc(probs, labels, k),
    }
    if k >= TOP_K_MIN_CLASSES:
        hits = tmf.multiclass_accuracy(
            probs, labels, top_k=min(top_k, k), average="micro", **common
        )
        out[f"top{min(top_k, k)}_accuracy"] = float(hits)
    out["ece"] = expected_calibration_error(probs, labels)
    out["count"] = int(labels.numel())
    precision = tmf.multiclass_precision(preds, labels, average=None, **common)
    recall = tmf.multiclass_recall(preds, labels, average=None, **common)
    f1 = tmf.multiclass_f1_score(preds, labels, average=None, **common)
    support = torch.bincount(labels, minlength=k)
    out["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return out


#: Equal-width confidence bins of the expected calibration error and the reliability diagram.
CALIBRATION_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """ECE: the gap between confidence and accuracy, averaged over confidence bins by count.

    torchmetrics' ``multiclass_calibration_error`` (L1, :data:`CALIBRATION_BINS` bins) on the
    top-class confidence: a model whose 0.9 means 0.7 has an ECE near 0.2.
    """
    k = probs.shape[1]
    return float(
        tmf.multiclass_calibration_error(probs, labels, num_classes=k, n_bins=CALIBRATION_BINS)
    )


def reliability(probs: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
    """The reliability diagram's bins: mean confidence, accuracy and images in each non-empty one.

    The same :data:`CALIBRATION_BINS` equal-width bins of the top-class confidence as
    :func:`expected_calibration_error` (``(lo, hi]``, the first one closed).
    """
    confidence, preds = probs.max(dim=1)
    correct = (preds == labels).float()
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    rows = []
    for b in range(CALIBRATION_BINS):
        inside = index == b
        count = int(inside.sum())
        if count:
            rows.append(
                {
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                    "ideal": float(confidence[inside].mean()),
                    "count": count,
                }
            )
    return rows


def calibration_csv(rows: Sequence[dict[str, float]]) -> str:
    """The reliability bins as CSV for ``dvc plots`` (accuracy against confidence, and ideal)."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["confidence", "accuracy", "ideal", "count"], lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


#: Points each class's curve keeps at most (evenly along it, the ends kept): a bounded size,
#: whatever the test split's, for the plot files and the pictures.
CURVE_POINTS = 201


def _thinned(*columns: torch.Tensor) -> list[list[float]]:
    """At most :data:`CURVE_POINTS` points of a curve, evenly by index, first and last kept."""
    count = int(columns[0].numel())
    keep = torch.linspace(0, count - 1, min(count, CURVE_POINTS)).round().long().unique()
    return [[round(float(v), 6) for v in column[keep].tolist()] for column in columns]


def class_curves(
    probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One-vs-rest ROC and precision-recall curves of every class (torchmetrics, exact).

    Exact (every distinct score a threshold, by sorting), then thinned to
    :data:`CURVE_POINTS`. Not torchmetrics' binned form: with the deterministic algorithms a
    training switches on, its bincount falls back to an ``(N*K*T, 4*K*T)`` comparison, 18 GB
    for 269 images of 10 classes.

    Args:
        probs: ``(N, K)`` probabilities.
        labels: ``(N,)`` true classes.
        class_names: The K names, in label order.

    Returns:
        ``(roc, pr)``: rows ``{class, fpr, tpr}`` (fpr rising) and ``{class, recall,
        precision}`` (recall falling), each class's points in the order of its curve.
    """
    roc: list[dict[str, Any]] = []
    pr: list[dict[str, Any]] = []
    for i, name in enumerate(class_names):
        scores, truth = probs[:, i].contiguous(), (labels == i).long()
        fpr, tpr, _ = tmf.binary_roc(scores, truth)
        precision, recall, _ = tmf.binary_precision_recall_curve(scores, truth)
        xs, ys = _thinned(fpr, tpr)
        roc += [{"class": name, "fpr": x, "tpr": y} for x, y in zip(xs, ys, strict=True)]
        xs, ys = _thinned(recall, precision)
        pr += [{"class": name, "recall": x, "precision": y} for x, y in zip(xs, ys, strict=True)]
    return roc, pr


def rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of one shape as CSV text, the first row's keys as the header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _auroc(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if k == 2:
        return float(tmf.binary_auroc(probs[:, 1], labels))
    return float(tmf.multiclass_auroc(probs, labels, num_classes=k, average="macro"))


def confusion_csv(preds: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> str:
    """One ``actual,predicted`` row per image, by class name: DVC's ``confusion`` template input."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(
        (class_names[a], class_names[p])
        for a, p in zip(labels.tolist(), preds.tolist(), strict=True)
    )
    return buf.getvalue()


PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


def per_class_csv(per_class: dict[str, dict[str, float]]) -> str:
    """One row per class (``class,precision,recall,f1,support``): a ``dvc plots`` bar chart.

    Per-class values live here rather than in ``metrics/eval.json``: as metrics they would add
    four ``dvc exp show`` columns per class and bury the headline figures.

    Args:
        per_class: ``{class name: {"precision", "recall", "f1", "support"}}`` from
            :func:`compute_metrics`.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for name, row in per_class.items():
        writer.writerow([name, *(row[key] for key in PER_CLASS_COLUMNS[1:])])
    return buf.getvalue()


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The test metrics that ``metrics/eval.json`` holds: every one but the per-class detail."""
    return {key: value for key, value in metrics.items() if key != "per_class"}


def worst_mistakes(probs: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` most confident wrong predictions, worst first.

    Ties keep dataset order (a stable sort), so the picture is the same on every run.
    """
    preds = probs.argmax(dim=1)
    wrong = torch.nonzero(preds != labels).flatten()
    confidence = probs[wrong, preds[wrong]]
    return wrong[torch.sort(confidence, descending=True, stable=True).indices[:count]]


def _metric_key(name: str) -> str:
    """A class name made safe for an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten evaluation metrics to ``test/...`` MLflow keys (per class: ``test/f1/<class>``)."""
    flat = {f"test/{k}": float(v) for k, v in metrics.items() if k != "per_class"}
    for name, values in metrics["per_class"].items():
        for metric, value in values.items():
            flat[f"test/{metric}/{_metric_key(name)}"] = float(value)
    return flat

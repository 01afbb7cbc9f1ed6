"""The evaluate stage: test-split metrics, DVC plots and pictures, logged to the train run.

The metric and plotting functions are pure (tensors and arrays in, values or figures out);
:func:`evaluate` is the one function that reads the checkpoint and writes outputs.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchmetrics.functional import classification as tmf

from convpipe.config import Params
from convpipe.data.datamodule import ArrayDataset, ConvDataModule
from convpipe.data.manifest import Manifest
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path, write_json, write_text
from convpipe.models.checkpoint import load_model
from convpipe.models.module import CNNClassifier
from convpipe.models.network import probabilities
from convpipe.tracking.provenance import RunInfo
from convpipe.tracking.store import check_reachable, mask_uri, mlflow_error
from convpipe.tracking.store import tracking_uri as resolve_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EVAL_BATCH = 512
EXAMPLE_IMAGES = 2  # test images saved with the registered model as its input example
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request
#: Top-k accuracy is reported from this many classes on: with fewer, the true class is among
#: any model's top k most of the time and the figure says little.
TOP_K_MIN_CLASSES = 6


@torch.no_grad()
def predict_logits(
    model: CNNClassifier, dataset: ArrayDataset, batch: int = EVAL_BATCH
) -> torch.Tensor:
    """Logits for every image of ``dataset``, in order: ``(N,)`` (2 classes) or ``(N, K)``."""
    outputs = []
    for start in range(0, len(dataset), batch):
        x, _ = dataset.__getitems__(list(range(start, min(start + batch, len(dataset)))))
        outputs.append(model(x))
    return torch.cat(outputs)


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


def worst_mistakes(probs: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` most confident wrong predictions, worst first.

    Ties keep dataset order (a stable sort), so the picture is the same on every run.
    """
    preds = probs.argmax(dim=1)
    wrong = torch.nonzero(preds != labels).flatten()
    confidence = probs[wrong, preds[wrong]]
    return wrong[torch.sort(confidence, descending=True, stable=True).indices[:count]]


def plot_misclassified(
    images: np.ndarray,
    labels: Sequence[int],
    preds: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
) -> Figure:
    """A grid of uint8 images ``(N, H, W, C)`` titled ``true → predicted (confidence)``."""
    n = max(len(images), 1)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(max(1.8 * cols, 4.5), 2.0 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, y, p, c in zip(axes.flat, images, labels, preds, confidence, strict=False):
        shown = image[..., 0] if image.shape[-1] == 1 else image
        ax.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(
            f"{class_names[y]} → {class_names[p]}\n({c:.2f})", fontsize=8, color="firebrick"
        )
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    fig.suptitle("Worst mistakes: true → predicted (confidence)", fontsize=10)
    fig.tight_layout()
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


def save_figure(fig: Figure, path: str | Path) -> None:
    """Save ``fig`` as PNG atomically (Figure without pyplot: no display, nothing to close)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


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


def read_history(path: str | Path) -> list[dict[str, str]]:
    """The train stage's per-epoch history rows.

    Raises:
        ConvpipeError: If the file is missing.
    """
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ConvpipeError(
            "training history not found", f"at {path}", "run `dvc repro train`"
        ) from None


def open_run(params: Params) -> tuple[MlflowClient, RunInfo]:
    """The client and run of the training, checked to exist before anything is computed.

    Raises:
        ConvpipeError: If the run record is missing, the server unreachable or the run unknown.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = RunInfo.load(params.paths.run_info)
    uri = resolve_uri(params.mlflow)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run.run_id)
    except (MlflowException, OSError) as exc:
        raise ConvpipeError(
            f"MLflow run {run.run_id} of the training not found ({type(exc).__name__})",
            f"at {mask_uri(uri)} (the training logged to {run.tracking_uri})",
            "use the tracking URI of the training, or rerun `dvc repro train`",
        ) from None
    return client, run


def evaluate(params: Params) -> dict[str, Any]:
    """Evaluate the trained model on the test split and write every evaluate-stage output.

    Raises:
        ConvpipeError: A missing or unsafe checkpoint, data the model was not trained for, or a
            tracking store without the training's run.
    """
    paths = params.paths
    client, run = open_run(params)
    model = load_model(paths.model)
    datamodule = ConvDataModule(paths.prepared, None, EVAL_BATCH, 0, False, params.base.seed)
    manifest = datamodule.manifest
    if model.num_classes != manifest.num_classes:
        raise ConvpipeError(
            f"the checkpoint has {model.num_classes} classes, the data has {manifest.num_classes}",
            f"at {paths.model}",
            "retrain with `dvc repro train`",
        )
    dataset = datamodule.split("test")
    labels = torch.from_numpy(dataset.y)
    logits = predict_logits(model, dataset)
    probs = probabilities(logits, manifest.num_classes)
    preds = probs.argmax(dim=1)
    metrics = {
        **compute_metrics(probs, labels, manifest.class_names, params.evaluate.top_k),
        "loss": test_loss(logits, labels),
    }
    write_json(paths.eval_metrics, headline(metrics))
    write_text(paths.eval_per_class, per_class_csv(metrics["per_class"]))
    write_text(paths.eval_confusion, confusion_csv(preds, labels, manifest.class_names))
    matrix = tmf.multiclass_confusion_matrix(
        preds, labels, num_classes=manifest.num_classes
    ).numpy()
    save_figure(plot_confusion(matrix, manifest.class_names), paths.confusion_png)
    worst = worst_mistakes(probs, labels, params.evaluate.misclassified)
    save_figure(
        plot_misclassified(
            np.asarray(dataset.x[worst.numpy()]),  # a handful of rows: read order is moot
            labels[worst].tolist(),
            preds[worst].tolist(),
            probs[worst, preds[worst]].tolist(),
            manifest.class_names,
        ),
        paths.misclassified_png,
    )
    save_figure(plot_curves(read_history(paths.train_history)), paths.curves_png)
    _log_to_run(client, run.run_id, params, metrics)
    _register(params, run.run_id, manifest, np.asarray(dataset.x[:EXAMPLE_IMAGES]), metrics)
    return metrics


def _register(
    params: Params, run_id: str, manifest: Manifest, examples: np.ndarray, metrics: dict[str, Any]
) -> None:
    """Log the model as a pyfunc into the run, register it, move ``champion`` if it is better."""
    from convpipe.registry import log_and_register  # imports this module: import on use

    log_and_register(
        resolve_uri(params.mlflow),
        run_id,
        params.mlflow.registered_model,
        params.paths.model,
        manifest,
        examples,
        metrics["accuracy"],
    )


def _log_to_run(client: MlflowClient, run_id: str, params: Params, metrics: dict[str, Any]) -> None:
    """Add the test metrics (batched) and pictures to the MLflow run of the training."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    paths = params.paths
    stamp = int(time.time() * 1000)
    values = [Metric(k, v, stamp, 0) for k, v in mlflow_metrics(metrics).items()]
    try:
        for start in range(0, len(values), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=values[start : start + METRICS_PER_BATCH])
        for path in (paths.confusion_png, paths.misclassified_png, paths.curves_png):
            client.log_artifact(run_id, path, "evaluation")
        client.log_artifact(run_id, paths.eval_metrics, "evaluation")
        client.log_artifact(run_id, paths.eval_per_class, "evaluation")
    except (MlflowException, OSError) as exc:
        raise mlflow_error(exc, resolve_uri(params.mlflow), f"logging to run {run_id}") from None

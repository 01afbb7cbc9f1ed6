"""The evaluate stage: the best checkpoint on the test split, its files, its MLflow run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional import classification as tmf

from convpipe.config.schema import Params
from convpipe.data.datamodule import EVAL_BATCH_SIZE
from convpipe.data.datasets import ArrayDataset
from convpipe.data.manifest import Manifest
from convpipe.errors import ConvpipeError
from convpipe.evaluation.gradcam import grad_cam
from convpipe.evaluation.metrics import (
    calibration_csv,
    class_curves,
    compute_metrics,
    confusion_csv,
    headline,
    mlflow_metrics,
    per_class_csv,
    reliability,
    rows_csv,
    test_loss,
    worst_mistakes,
)
from convpipe.evaluation.plots import (
    plot_class_curves,
    plot_confusion,
    plot_curves,
    plot_misclassified,
    plot_reliability,
    save_figure,
)
from convpipe.inference.calibration import (
    Calibration,
    checkpoint_digest,
    fit_temperature,
    nll,
    write_calibration,
)
from convpipe.inference.predict import predict_logits, prepared_split
from convpipe.inference.trained import load_trained
from convpipe.io import write_json, write_text
from convpipe.models.module import CNNClassifier
from convpipe.models.network import probabilities
from convpipe.tracking.runs import log_evaluation, open_training_run
from convpipe.tracking.store import tracking_uri as resolve_uri

log = logging.getLogger(__name__)

EXAMPLE_IMAGES = 2  # test images saved with the registered model as its input example


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


def evaluate(params: Params) -> dict[str, Any]:
    """Evaluate the trained model on the test split and write every evaluate-stage output.

    Raises:
        ConvpipeError: A missing or unsafe checkpoint, data the model was not trained for, or a
            tracking store without the training's run.
    """
    paths = params.paths
    client, run = open_training_run(params)
    model, manifest = load_trained(paths.model, paths.prepared, params.train.accelerator)
    calibration = calibrate(params, model)
    dataset = prepared_split(paths.prepared, "test", params.base.seed)
    labels = torch.from_numpy(dataset.y)
    logits = predict_logits(model, dataset, EVAL_BATCH_SIZE, params.evaluate.tta)
    probs = probabilities(logits, manifest.num_classes)
    preds = probs.argmax(dim=1)
    metrics = {
        **compute_metrics(probs, labels, manifest.class_names, params.evaluate.top_k),
        "loss": test_loss(logits, labels),
        "temperature": calibration.temperature,
    }
    write_json(paths.eval_metrics, headline(metrics))
    write_text(paths.eval_per_class, per_class_csv(metrics["per_class"]))
    write_text(paths.eval_confusion, confusion_csv(preds, labels, manifest.class_names))
    matrix = tmf.multiclass_confusion_matrix(
        preds, labels, num_classes=manifest.num_classes
    ).numpy()
    save_figure(plot_confusion(matrix, manifest.class_names), paths.confusion_png)
    worst = worst_mistakes(probs, labels, params.evaluate.misclassified)
    shown = (
        np.asarray(dataset.x[worst.numpy()]),  # a handful of rows: read order is moot
        labels[worst].tolist(),
        preds[worst].tolist(),
        probs[worst, preds[worst]].tolist(),
        manifest.class_names,
    )
    save_figure(plot_misclassified(*shown), paths.misclassified_png)
    heat = _mistakes_cam(model, dataset, worst, preds)
    save_figure(plot_misclassified(*shown, heat=heat), paths.gradcam_png)
    save_figure(plot_curves(read_history(paths.train_history)), paths.curves_png)
    roc, pr = class_curves(probs, labels, manifest.class_names)
    write_text(paths.eval_roc, rows_csv(roc))
    write_text(paths.eval_pr, rows_csv(pr))
    save_figure(plot_class_curves(roc, pr, metrics["auroc_macro"]), paths.roc_pr_png)
    bins = reliability(probs, labels)
    write_text(paths.eval_calibration, calibration_csv(bins))
    reliability_figure = plot_reliability(bins, metrics["ece"], calibration.temperature)
    save_figure(reliability_figure, paths.reliability_png)
    logged = mlflow_metrics(metrics)  # the run's test metrics, then the model's
    log_evaluation(client, run.run_id, params, logged)
    examples = np.asarray(dataset.x[:EXAMPLE_IMAGES])
    _register(params, run.run_id, manifest, examples, logged, (preds == labels).numpy())
    return metrics


def calibrate(params: Params, model: CNNClassifier) -> Calibration:
    """Fit ``evaluate.calibration`` on the validation split, write it, and apply it to ``model``.

    The validation logits are taken with ``evaluate.tta``, as the test's and the served
    model's are. ``none``, or a split with nothing to fit (no mistake: see
    :func:`~convpipe.inference.calibration.fit_temperature`), writes ``T = 1``, so
    ``paths.calibration`` always names the checkpoint it belongs to.

    Args:
        params: The validated params.
        model: The loaded checkpoint (its :attr:`~CNNClassifier.temperature` is set).

    Returns:
        What was written to ``paths.calibration``.
    """
    paths, tta = params.paths, params.evaluate.tta
    digest = checkpoint_digest(paths.model)
    if params.evaluate.calibration == "none":
        calibration = Calibration("none", 1.0, digest)
    else:
        val = prepared_split(paths.prepared, "val", params.base.seed)
        labels = torch.from_numpy(val.y)
        model.temperature = 1.0
        logits = predict_logits(model, val, EVAL_BATCH_SIZE, tta) if len(val) else torch.empty(0)
        fitted = fit_temperature(logits, labels)
        temperature = 1.0 if fitted is None else fitted
        before, after = nll(logits, labels), nll(logits, labels, temperature)
        calibration = Calibration(
            "temperature", temperature, digest, "val", len(labels), tta, before, after
        )
        _say_calibration(fitted, len(labels), before, after)
    write_calibration(paths.calibration, calibration)
    model.temperature = calibration.temperature
    return calibration


def _say_calibration(fitted: float | None, images: int, before: float, after: float) -> None:
    """One line: the fitted temperature and what it did to the validation NLL, or why none."""
    if fitted is None:
        log.warning(
            "temperature scaling: the NLL of the %d validation images has no minimum inside "
            "T in [1/20, 20] (as when the model makes no mistake on them: the NLL then keeps "
            "falling as T -> 0): T stays 1; a larger val split (data.val_fraction) gives it "
            "mistakes to fit on",
            images,
        )
        return
    log.info(
        "temperature scaling: T = %.4g fitted on %d validation images (NLL %.4f -> %.4f)",
        fitted,
        images,
        before,
        after,
    )


def _mistakes_cam(
    model: CNNClassifier, dataset: ArrayDataset, worst: torch.Tensor, preds: torch.Tensor
) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` of the predicted class on the ``worst`` mistakes."""
    if not len(worst):
        return np.zeros((0, *model.input_shape[1:]), dtype=np.float32)
    images, _ = dataset.__getitems__(worst.tolist())  # normalised as for the network
    return grad_cam(model, images, preds[worst]).numpy()


def _register(
    params: Params,
    run_id: str,
    manifest: Manifest,
    examples: np.ndarray,
    metrics: dict[str, float],
    correct: np.ndarray,
) -> None:
    """Log the model as a pyfunc into the run, register it, move ``champion`` if it is better.

    Better: by McNemar's exact test against the champion on the same test images
    (``correct``: which ones this model got right), at ``evaluate.promotion_alpha``;
    ``metrics`` are the run's flat ``test/...`` metrics, linked to the logged model.
    """
    from convpipe.tracking.pyfunc import Serving
    from convpipe.tracking.registry import log_and_register

    log_and_register(
        resolve_uri(params.mlflow),
        run_id,
        params.mlflow.registered_model,
        params.paths.model,
        manifest,
        examples,
        metrics,
        Serving(params.evaluate.tta, metrics["test/temperature"]),
        correct,
        params.evaluate.promotion_alpha,
    )

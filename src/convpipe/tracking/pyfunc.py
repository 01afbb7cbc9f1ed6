"""The registered model's code: an MLflow pyfunc that classifies raw uint8 images.

``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) builds :class:`ImageClassifier`
from the model directory that :mod:`convpipe.tracking.registry` logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Map

from convpipe.data.manifest import load_manifest
from convpipe.inference.predict import predict_images
from convpipe.inference.trained import check_matches
from convpipe.models.checkpoint import load_model
from convpipe.models.tta import TTA_MODES


def model_input(images: np.ndarray) -> np.ndarray:
    """Convpipe's uint8 ``(N, H, W, C)`` images as the pyfunc takes them.

    Returns:
        ``(N, H, W)`` for grayscale (``C == 1``), else the images unchanged.
    """
    return images[..., 0] if images.shape[-1] == 1 else images


def image_signature(channels: int, image_hw: tuple[int, int]) -> ModelSignature:
    """The pyfunc's signature for images of ``channels`` x ``image_hw``.

    Input: one uint8 tensor, ``(-1, H, W)`` for grayscale or ``(-1, H, W, C)``.
    Output: one row per image with ``class`` (the predicted class name), ``probability`` (its
    probability) and ``probabilities`` (class name -> probability, every class).
    """
    h, w = image_hw
    shape = (-1, h, w) if channels == 1 else (-1, h, w, channels)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "class"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
    )


def prediction_frame(
    ranked: Sequence[Sequence[tuple[str, float]]], class_names: Sequence[str]
) -> pd.DataFrame:
    """The pyfunc's output from :func:`~convpipe.inference.predict.predict_images`, all K classes.

    Args:
        ranked: Per image, every ``(class name, probability)`` pair, most probable first.
        class_names: The K class names in label order (the order of ``probabilities``).

    Returns:
        One row per image: ``class``, ``probability``, ``probabilities`` (a dict in class order).
    """
    rows = []
    for pairs in ranked:
        by_name = dict(pairs)
        rows.append(
            {
                "class": pairs[0][0],
                "probability": pairs[0][1],
                "probabilities": {name: by_name[name] for name in class_names},
            }
        )
    return pd.DataFrame(rows, columns=["class", "probability", "probabilities"])


# the model directory's settings of how it predicts: its test-time augmentation, temperature
SERVING = "serving.json"


class Serving(NamedTuple):
    """How the logged model predicts, as evaluate measured it (the ``serving`` artifact).

    Attributes:
        tta: ``evaluate.tta``.
        temperature: The logits are divided by it (``evaluate.calibration``; 1.0: none).
    """

    tta: str
    temperature: float = 1.0


def write_serving(path: Path, serving: Serving) -> None:
    """Write the ``serving`` artifact."""
    path.write_text(json.dumps(serving._asdict()), encoding="utf-8")


def read_serving(artifacts: dict[str, str]) -> Serving:
    """How a loaded model predicts: its ``serving`` artifact.

    Not MLflow's ``model_config``: logging one also logs its keys as params of the training's
    run, and a changed ``evaluate.tta`` would then clash with the run's earlier value. A model
    registered before calibration existed has no temperature: 1.0.

    Raises:
        ValueError: For a TTA that is not one of :data:`TTA_MODES`, or a temperature that is not
            a positive number.
    """
    stored = json.loads(Path(artifacts["serving"]).read_text(encoding="utf-8"))
    tta, temperature = stored["tta"], float(stored.get("temperature", 1.0))
    if tta not in TTA_MODES:
        raise ValueError(f"serving tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"serving temperature must be a positive number, got {temperature}")
    return Serving(str(tta), temperature)


class ImageClassifier(PythonModel):
    """Raw uint8 images in, class names and probabilities out (see :func:`image_signature`).

    The model directory's artifacts are ``checkpoint`` (the Lightning checkpoint) and
    ``manifest`` (the prepared data's ``manifest.json``: class names, image size, mean, std)
    and ``serving`` (:data:`SERVING`: the test-time augmentation and temperature it predicts
    with).
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the checkpoint weights-only and the manifest, and check that they match."""
        checkpoint = context.artifacts["checkpoint"]
        self.manifest = load_manifest(Path(context.artifacts["manifest"]).parent)
        self.model = load_model(checkpoint)
        check_matches(self.model, self.manifest, f"in the MLflow model at {checkpoint}")
        serving = read_serving(context.artifacts)
        self.tta = serving.tta
        self.model.temperature = serving.temperature

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Classify uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, C)``."""
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[..., None]
        m = self.manifest
        ranked = predict_images(self.model, images, m.mean, m.std, m.num_classes, self.tta)
        return prediction_frame(ranked, m.class_names)

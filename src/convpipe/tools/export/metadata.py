"""The metadata an exported file carries: what a consumer needs to use it."""

from __future__ import annotations

import json
from typing import Any

from convpipe import __version__
from convpipe.data.manifest import Manifest
from convpipe.models.module import CNNClassifier
from convpipe.tools.export.network import INPUT_NAME, OUTPUT_NAME

__all__ = ["EXTRA_FILE", "METADATA_VERSION", "export_metadata", "from_onnx_props", "onnx_props"]

EXTRA_FILE = "convpipe.json"  # pt2 and TorchScript: the metadata as one JSON extra file
METADATA_VERSION = 1


def export_metadata(model: CNNClassifier, manifest: Manifest) -> dict[str, Any]:
    """What a consumer of the exported file needs, as plain JSON-able data.

    Args:
        model: The trained classifier.
        manifest: The prepared data it was trained on (mean/std and class names).

    Returns:
        ``class_names``, ``num_classes``, ``channels``, ``image_size`` ``[H, W]``, ``mean``,
        ``std``, input/output names and shapes (``"N"`` for the free batch dimension),
        ``preprocessing``, ``probabilities`` (``sigmoid`` for 2 classes, else ``softmax``),
        ``temperature`` (the logits are already divided by it: ``evaluate.calibration``; 1.0
        for none) and ``postprocessing`` saying how to turn the logits into class
        probabilities.
    """
    names = list(model.hparams.get("class_names") or manifest.class_names)
    channels, height, width = model.input_shape
    binary = model.binary
    output_shape: list[Any] = ["N"] if binary else ["N", model.num_classes]
    if binary:
        post = f"p = sigmoid(logit) is the probability of '{names[1]}', 1 - p that of '{names[0]}'"
    else:
        post = "softmax over the last dimension gives the probabilities of class_names, in order"
    temperature = float(model.temperature)
    if temperature != 1.0:
        post += (
            f"; the logits are already divided by the temperature {temperature:g} fitted on "
            "the validation split, so these probabilities are calibrated"
        )
    return {
        "metadata_version": METADATA_VERSION,
        "producer": f"convpipe {__version__}",
        "class_names": names,
        "num_classes": model.num_classes,
        "channels": channels,
        "image_size": [height, width],
        "mean": [float(v) for v in manifest.mean],
        "std": [float(v) for v in manifest.std],
        "input_name": INPUT_NAME,
        "input_shape": ["N", channels, height, width],
        "input_dtype": "float32",
        "preprocessing": (
            f"{'grey' if channels == 1 else 'RGB'} image resized to {height}x{width} (bilinear); "
            "x = (pixel / 255 - mean[c]) / std[c]; layout NCHW"
        ),
        "output_name": OUTPUT_NAME,
        "output_shape": output_shape,
        "probabilities": "sigmoid" if binary else "softmax",
        "temperature": temperature,
        "postprocessing": post,
    }


# metadata values that are strings: stored as they are in ONNX metadata_props, not as JSON
TEXT_KEYS = frozenset(
    (
        "producer",
        "input_name",
        "input_dtype",
        "preprocessing",
        "output_name",
        "probabilities",
        "postprocessing",
    )
)


def onnx_props(metadata: dict[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props`` (string to string): strings as they are, the rest as JSON."""
    return {k: v if k in TEXT_KEYS else json.dumps(v) for k, v in metadata.items()}


def from_onnx_props(props: dict[str, str]) -> dict[str, Any]:
    """Invert :func:`onnx_props`; the exporter's own ``pkg.*`` entries are left out."""
    out: dict[str, Any] = {}
    for key, text in props.items():
        if key.startswith("pkg."):
            continue
        try:
            out[key] = text if key in TEXT_KEYS else json.loads(text)
        except json.JSONDecodeError:  # an entry another tool added
            out[key] = text
    return out

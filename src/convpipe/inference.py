"""Looking at a model without training it: layer summary and predictions on image files.

``convpipe summary`` tabulates, per layer of the network ``params.model`` builds for the
prepared data, its output shape, parameters, receptive field and jump, and compares the total
with the fully connected network that replaces every conv layer by a dense one.
``convpipe predict`` classifies image files with the trained checkpoint, preprocessing them
exactly like the prepare stage did the training images.

Receptive field ``r`` and jump ``j`` (distance in input pixels between adjacent outputs) start
at ``r = j = 1`` on the input image; a conv or pooling layer with kernel ``k`` and stride ``s``
gives ``r_out = r_in + (k - 1) * j_in`` and ``j_out = j_in * s``. Padding shifts the field but
does not change its size.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from convpipe.config import ModelParams
from convpipe.data.images import is_image_file, normalize, open_image
from convpipe.data.manifest import Manifest
from convpipe.data.raw import BadFileError
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.errors import ConvpipeError
from convpipe.models.module import CNNClassifier
from convpipe.models.network import probabilities
from convpipe.models.shapes import layer_shapes

__all__ = [
    "FORMATS",
    "LayerField",
    "Prediction",
    "check_data_matches",
    "dense_equivalent_parameters",
    "find_images",
    "format_predictions",
    "format_summary",
    "load_image",
    "predict_files",
    "predict_images",
    "receptive_fields",
    "render_table",
    "summary_dict",
]

PREDICT_BATCH = 256
FORMATS = ("table", "csv", "json")


# --------------------------------------------------------------------------- summary


class LayerField(NamedTuple):
    """One row of :func:`receptive_fields`: a :class:`~convpipe.models.shapes.LayerShape` and more.

    Attributes:
        name: Where the layer comes from, e.g. ``model.conv[0].pool``.
        layer: A short human description.
        shape: Output shape without the batch dimension: ``(C, H, W)`` or ``(F,)``.
        parameters: Trainable parameters of the layer.
        receptive_field: Side in input pixels of the window one output unit sees; None for
            flatten and dense layers (they see the whole image).
        jump: Input pixels between adjacent output units (cumulative stride); None as above.
        dense_parameters: Parameters of the layer in the fully connected equivalent: for a conv
            layer ``in_C*in_H*in_W * out_C*out_H*out_W + out_C*out_H*out_W`` (weights and one
            bias per output unit), else ``parameters``.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    parameters: int
    receptive_field: int | None
    jump: int | None
    dense_parameters: int


def _windows(params: ModelParams) -> dict[str, tuple[int, int, bool]]:
    """``layer name -> (kernel, stride, is_conv)`` for every conv and pooling layer."""
    windows: dict[str, tuple[int, int, bool]] = {}
    for i, block in enumerate(params.conv):
        windows[f"model.conv[{i}]"] = (block.kernel, block.stride, True)
        windows[f"model.conv[{i}].pool"] = (block.pool_size, block.pool_size, False)
    return windows


def receptive_fields(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> list[LayerField]:
    """Per-layer shapes, parameters, receptive fields, jumps and dense-equivalent parameters.

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        One :class:`LayerField` per row of :func:`convpipe.models.shapes.layer_shapes`, in forward
        order.

    Raises:
        ConvpipeError: As :func:`convpipe.models.shapes.layer_shapes` (bad inputs, a stack that
            shrinks the image below 1x1).
    """
    rows = layer_shapes(params, in_channels, image_hw, num_classes)
    windows = _windows(params)
    field, jump = 1, 1
    volume = in_channels * int(image_hw[0]) * int(image_hw[1])
    out: list[LayerField] = []
    for row in rows:
        units = math.prod(row.shape)
        window = windows.get(row.name)
        if window is None:
            out.append(LayerField(*row, None, None, row.parameters))
        else:
            kernel, stride, is_conv = window
            field += (kernel - 1) * jump
            jump *= stride
            dense = volume * units + units if is_conv else row.parameters
            out.append(LayerField(*row, field, jump, dense))
        volume = units
    return out


def dense_equivalent_parameters(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> int:
    """Parameters of the network with every conv layer replaced by a dense layer.

    Each conv layer becomes a fully connected layer from its input volume ``(C, H, W)`` to its
    output volume ``(C', H', W')`` with one bias per output unit (batch-norm parameters are
    not counted for it); pooling, hidden and output layers are kept as they are.

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        The total parameter count of that fully connected network.
    """
    rows = receptive_fields(params, in_channels, image_hw, num_classes)
    return sum(row.dense_parameters for row in rows)


def summary_dict(params: ModelParams, manifest: Manifest) -> dict[str, Any]:
    """The summary of the network ``params`` builds for the prepared data, as plain data.

    Args:
        params: The ``model`` section.
        manifest: The prepared data's manifest (channels, image size, classes).

    Returns:
        ``{"input": [C, H, W], "num_classes", "layers": [...], "total_parameters",
        "dense_equivalent_parameters", "ratio"}``; ``ratio`` is dense-equivalent / total.
    """
    hw = manifest.image_hw
    rows = receptive_fields(params, manifest.channels, hw, manifest.num_classes)
    total = sum(row.parameters for row in rows)
    dense = sum(row.dense_parameters for row in rows)
    return {
        "input": [manifest.channels, *hw],
        "num_classes": manifest.num_classes,
        "layers": [row._asdict() | {"shape": list(row.shape)} for row in rows],
        "total_parameters": total,
        "dense_equivalent_parameters": dense,
        "ratio": dense / total,
    }


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: left-aligned columns two spaces apart, a dashed rule under the header.

    Args:
        headers: Column titles.
        rows: Cells, each row at most ``len(headers)`` long (shorter rows leave cells empty).

    Returns:
        The table, one line per row plus two header lines.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [headers, ["-" * w for w in widths], *rows]
    return "".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() + "\n"
        for line in lines
    )


def _fmt(value: int | None) -> str:
    return "image" if value is None else f"{value:,}"


def format_summary(summary: dict[str, Any]) -> str:
    """Render :func:`summary_dict` as the ``convpipe summary`` table."""
    headers = ["layer", "description", "output", "params", "rf", "jump", "dense-equiv"]
    rows = [
        [
            layer["name"],
            layer["layer"],
            "x".join(map(str, layer["shape"])),
            f"{layer['parameters']:,}",
            _fmt(layer["receptive_field"]),
            "-" if layer["jump"] is None else str(layer["jump"]),
            f"{layer['dense_parameters']:,}",
        ]
        for layer in summary["layers"]
    ]
    c, h, w = summary["input"]
    return (
        f"input {c}x{h}x{w}, {summary['num_classes']} classes\n"
        + render_table(headers, rows)
        + f"total parameters: {summary['total_parameters']:,}\n"
        + "fully connected equivalent (conv layers as dense layers): "
        + f"{summary['dense_equivalent_parameters']:,} parameters, "
        + f"{summary['ratio']:,.1f}x as many\n"
    )


# --------------------------------------------------------------------------- prediction


class Prediction(NamedTuple):
    """One input file's result.

    Attributes:
        path: The file as found on the command line or under a folder given there.
        top: ``(class name, probability)`` pairs, most probable first; empty on error.
        error: Why the file could not be classified, or None.
    """

    path: str
    top: list[tuple[str, float]]
    error: str | None


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand folders into the image files under them (recursively, sorted).

    Args:
        paths: Files and folders. A file is kept whatever its extension (so a wrong file given
            by name gets an error row); a folder contributes only :data:`IMAGE_EXTENSIONS`
            files.

    Returns:
        The files, in command-line order, each folder's files sorted.
    """
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = (p for p in path.rglob("*") if is_image_file(p.name) and p.is_file())
            files.extend(sorted(str(p) for p in found))
        else:
            files.append(str(path))
    return files


def load_image(path: str, channels: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Read one file as the prepare stage reads training images.

    Args:
        path: The image file.
        channels: 1 or 3.
        image_hw: ``(H, W)`` to resize to (bilinear, antialiased when shrinking).

    Returns:
        uint8 ``(H, W, channels)``.

    Raises:
        BadFileError: If the file is missing or cannot be decoded or converted.
    """
    if not os.path.lexists(path):
        raise BadFileError(path, "no such file or directory")
    if os.path.isdir(path):
        raise BadFileError(path, "is a directory")
    try:
        return normalize(open_image(path), channels, image_hw)
    except ValueError as exc:  # an image mode normalize does not convert
        raise BadFileError(path, str(exc)) from None


def _class_names(model: CNNClassifier) -> list[str]:
    names = model.hparams.get("class_names")
    return list(names) if names else [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def predict_images(
    model: CNNClassifier,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    top_k: int,
    batch: int = PREDICT_BATCH,
) -> list[list[tuple[str, float]]]:
    """Top-k classes of each image.

    Args:
        model: The classifier (put in eval mode here).
        images: uint8 ``(N, H, W, C)`` with the model's ``C, H, W``.
        mean: Per-channel mean of the training images (length C).
        std: Per-channel standard deviation (length C).
        top_k: Classes per image (>= 1; more than K gives all K).
        batch: Images per forward pass.

    Returns:
        ``N`` lists of ``min(top_k, K)`` ``(class name, probability)`` pairs, most probable
        first (ties in class order).

    Raises:
        ValueError: If ``top_k < 1`` or ``images`` is not uint8 ``(N, H, W, C)``.
        ConvpipeError: If the images do not have the shape the model was built for.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    model.eval()
    names = _class_names(model)
    k = min(top_k, model.num_classes)
    results: list[list[tuple[str, float]]] = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.array(images[start : start + batch], dtype=np.uint8))
        probs = probabilities(model(normalize_batch(chunk, mean, std)), model.num_classes)
        values, indices = probs.topk(k, dim=1, sorted=True)
        for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True):
            results.append([(names[i], float(p)) for p, i in zip(row_p, row_i, strict=True)])
    return results


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(
    model: CNNClassifier,
    files: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    top_k: int,
    batch: int = PREDICT_BATCH,
) -> list[Prediction]:
    """Load and classify image files; a file that fails gets an error row, the others go on.

    Only ``batch`` decoded images are held at a time.

    Args:
        model: The classifier; its ``hparams`` give the channels and ``image_hw``.
        files: Image files (see :func:`find_images`).
        mean: Per-channel mean of the training images.
        std: Per-channel standard deviation.
        top_k: Classes per image (>= 1).
        batch: Files decoded and classified together.

    Returns:
        One :class:`Prediction` per file, in the order of ``files``.
    """
    channels = int(model.hparams["in_channels"])
    hw_list = model.hparams["image_hw"]
    hw = (int(hw_list[0]), int(hw_list[1]))
    results: list[Prediction] = []
    for chunk in _chunks(files, batch):
        loaded: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                loaded[i] = load_image(path, channels, hw)
            except BadFileError as exc:
                errors[i] = exc.reason
        tops: dict[int, list[tuple[str, float]]] = {}
        if loaded:
            stacked = np.stack(list(loaded.values()))
            tops = dict(zip(loaded, predict_images(model, stacked, mean, std, top_k), strict=True))
        results.extend(
            Prediction(path, tops.get(i, []), errors.get(i)) for i, path in enumerate(chunk)
        )
    return results


def _csv_text(predictions: Sequence[Prediction], k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    ranks = range(1, k + 1)
    writer.writerow(
        ["path", *(f"{what}_{r}" for r in ranks for what in ("class", "probability")), "error"]
    )
    for pred in predictions:
        cells: list[str] = []
        for r in ranks:
            pair = pred.top[r - 1] if r <= len(pred.top) else None
            cells += [pair[0], f"{pair[1]:.6f}"] if pair else ["", ""]
        writer.writerow([pred.path, *cells, pred.error or ""])
    return out.getvalue()


def _json_text(predictions: Sequence[Prediction]) -> str:
    rows = [
        {
            "path": pred.path,
            "predictions": [{"class": name, "probability": p} for name, p in pred.top],
            "error": pred.error,
        }
        for pred in predictions
    ]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def _table_text(predictions: Sequence[Prediction], k: int) -> str:
    headers = ["file", *(f"top {r}" for r in range(1, k + 1))]
    rows = [
        [pred.path, f"ERROR: {pred.error}"]
        if pred.error is not None
        else [pred.path, *(f"{name} {p:.4f}" for name, p in pred.top)]
        for pred in predictions
    ]
    return render_table(headers, rows)


def format_predictions(predictions: Sequence[Prediction], fmt: str, top_k: int) -> str:
    """Render predictions.

    Args:
        predictions: From :func:`predict_files`.
        fmt: ``table`` (aligned text, ``name probability`` per rank, ``ERROR: reason`` for a
            failed file), ``csv`` (``path,class_1,probability_1,...,class_k,probability_k,error``)
            or ``json`` (a list of ``{"path", "predictions": [{"class", "probability"}],
            "error"}``).
        top_k: Ranks to show (columns of the table and the CSV).

    Returns:
        The text, ending with a newline.

    Raises:
        ValueError: For an unknown ``fmt``.
    """
    k = max((len(p.top) for p in predictions), default=0) or top_k
    if fmt == "csv":
        return _csv_text(predictions, k)
    if fmt == "json":
        return _json_text(predictions)
    if fmt == "table":
        return _table_text(predictions, k)
    raise ValueError(f"unknown format {fmt!r}, expected one of {FORMATS}")


def check_data_matches(model: CNNClassifier, manifest: Manifest, where: str) -> None:
    """Refuse mean/std from prepared data of another geometry than the model's.

    Raises:
        ConvpipeError: If channels or image size differ.
    """
    model_shape = (int(model.hparams["in_channels"]), *map(int, model.hparams["image_hw"]))
    data_shape = (manifest.channels, *manifest.image_hw)
    if model_shape != data_shape or len(manifest.mean) != manifest.channels:
        raise ConvpipeError(
            f"the model was trained on {'x'.join(map(str, model_shape))} images but the "
            f"prepared data is {'x'.join(map(str, data_shape))}",
            where,
            "re-run `dvc repro` so model and prepared data match",
        )

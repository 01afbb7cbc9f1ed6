"""``convpipe predict``: image files through the trained checkpoint.

Each file is preprocessed exactly like the prepare stage did the training images.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from convpipe.data.images import is_image_file, normalize, open_image
from convpipe.data.manifest import Manifest
from convpipe.data.raw import BadFileError
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.errors import ConvpipeError
from convpipe.models.module import CNNClassifier
from convpipe.models.network import probabilities
from convpipe.models.tta import tta_logits
from convpipe.tools.summary import render_table

PREDICT_BATCH = 256

FORMATS = ("table", "csv", "json")


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


def load_image(path: str, channels: int, image_hw: tuple[int, int], *, resize: str) -> np.ndarray:
    """Read one file as the prepare stage reads training images.

    Args:
        path: The image file.
        channels: 1 or 3.
        image_hw: ``(H, W)`` to resize to (bilinear, antialiased when shrinking).
        resize: How the image meets ``image_hw``: the prepared data's ``data.resize``
            (``manifest.resize``), so a photo is seen as the test images were.

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
        return normalize(open_image(path), channels, image_hw, resize)
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
    tta: str = "none",
) -> list[list[tuple[str, float]]]:
    """Top-k classes of each image.

    Args:
        model: The classifier (put in eval mode here).
        images: uint8 ``(N, H, W, C)`` with the model's ``C, H, W``.
        mean: Per-channel mean of the training images (length C).
        std: Per-channel standard deviation (length C).
        top_k: Classes per image (>= 1; more than K gives all K).
        batch: Images per forward pass.
        tta: ``evaluate.tta``: average the logits over flipped/shifted views
            (:func:`convpipe.models.tta.tta_logits`).

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
    device = next(model.parameters()).device
    names = _class_names(model)
    k = min(top_k, model.num_classes)
    results: list[list[tuple[str, float]]] = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.array(images[start : start + batch], dtype=np.uint8))
        # uint8 to the model's device, normalised there (a quarter of float32's bytes)
        logits = tta_logits(model, normalize_batch(chunk.to(device), mean, std), tta)
        probs = probabilities(logits.cpu(), model.num_classes)
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
    tta: str = "none",
    *,
    resize: str,
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
        tta: ``evaluate.tta`` (see :func:`predict_images`).
        resize: ``data.resize`` of the prepared data (``manifest.resize``).

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
                loaded[i] = load_image(path, channels, hw, resize=resize)
            except BadFileError as exc:
                errors[i] = exc.reason
        tops: dict[int, list[tuple[str, float]]] = {}
        if loaded:
            stacked = np.stack(list(loaded.values()))
            ranked = predict_images(model, stacked, mean, std, top_k, batch, tta)
            tops = dict(zip(loaded, ranked, strict=True))
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

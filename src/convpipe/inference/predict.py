"""Logits and top-k classes from a trained model: of a prepared split, of uint8 images, of files.

Every path crosses to the model's device as uint8 and is normalised there (a quarter of
float32's bytes), as training does with ``runtime.batch_transform: device``, and goes through
:func:`convpipe.models.tta.tta_logits` with the ``evaluate.tta`` the caller passes: the
served model is the one evaluated. Batch size does not change the logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from convpipe.data.datamodule import EVAL_BATCH_SIZE, ConvDataModule
from convpipe.data.datasets import ArrayDataset
from convpipe.data.images import is_image_file, normalize, open_image
from convpipe.data.raw import BadFileError
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.models.module import CNNClassifier
from convpipe.models.network import probabilities
from convpipe.models.tta import tta_logits

__all__ = [
    "Prediction",
    "find_images",
    "load_image",
    "predict_files",
    "predict_images",
    "predict_logits",
    "prepared_split",
]


class Batches(Protocol):
    """What :func:`predict_logits` reads: uint8 batches by index and their transform."""

    @property
    def transform(self) -> Callable[[Tensor], Tensor] | None: ...

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]: ...


def prepared_split(prepared: str | Path, split: str, seed: int) -> ArrayDataset:
    """One split of the prepared data, read from disk as inference reads it.

    Args:
        prepared: The prepared data folder (``paths.prepared``).
        split: ``train``, ``val`` or ``test``.
        seed: ``base.seed`` (the data module's; inference reads in order).

    Returns:
        The split's uint8 images ``(N, H, W, C)``, labels and their normalising transform.
    """
    datamodule = ConvDataModule(
        prepared, None, EVAL_BATCH_SIZE, 0, False, seed, batch_transform="loader", resident=False
    )
    return datamodule.split(split)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Batches, batch: int, tta: str) -> Tensor:
    """Logits for every image of ``dataset``, in order: ``(N,)`` (2 classes) or ``(N, K)``.

    Args:
        model: A :class:`CNNClassifier` (or its exported twin) in eval mode.
        dataset: uint8 images ``(N, H, W, C)`` read by index, and the transform to
            ``(N, C, H, W)`` (an ``ArrayDataset``).
        batch: Images per forward pass (:data:`EVAL_BATCH_SIZE`).
        tta: ``evaluate.tta``: the test-time augmentation (``none`` for the network alone).

    Returns:
        The logits, on the CPU.
    """
    device = next(model.parameters(), torch.empty(0)).device
    outputs = []
    for start in range(0, len(dataset), batch):
        images, _ = dataset.read(range(start, min(start + batch, len(dataset))))
        x = images.to(device)
        if dataset.transform is not None:
            x = dataset.transform(x)
        outputs.append(tta_logits(model, x, tta).cpu())
    return torch.cat(outputs)


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
    tta: str,
    batch: int = EVAL_BATCH_SIZE,
) -> list[list[tuple[str, float]]]:
    """Top-k classes of each image.

    Args:
        model: The classifier (put in eval mode here).
        images: uint8 ``(N, H, W, C)`` with the model's ``C, H, W``.
        mean: Per-channel mean of the training images (length C).
        std: Per-channel standard deviation (length C).
        top_k: Classes per image (>= 1; more than K gives all K).
        tta: ``evaluate.tta``: average the logits over flipped/shifted views
            (:func:`convpipe.models.tta.tta_logits`).
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
    tta: str,
    batch: int = EVAL_BATCH_SIZE,
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
        tta: ``evaluate.tta`` (see :func:`predict_images`).
        batch: Files decoded and classified together.
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
            ranked = predict_images(model, stacked, mean, std, top_k, tta, batch)
            tops = dict(zip(loaded, ranked, strict=True))
        results.extend(
            Prediction(path, tops.get(i, []), errors.get(i)) for i, path in enumerate(chunk)
        )
    return results

"""The ``cifar`` source: the python versions of CIFAR-10 or CIFAR-100.

The batches are pickles, so every file goes through a restricted unpickler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convpipe.data.raw import RawDataset
from convpipe.data.readers.base import ArrayReader, BatchesReader, Part, existing, labelled
from convpipe.data.safe_pickle import restricted_load
from convpipe.errors import ConvpipeError


@dataclass(frozen=True)
class _CifarLayout:
    kind: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str

    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


_CIFAR10 = _CifarLayout(
    "CIFAR-10",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    "labels",
    "label_names",
)
_CIFAR100 = _CifarLayout("CIFAR-100", ("train",), "test", "meta", "fine_labels", "fine_label_names")
_CIFAR_SIDE = 32
_CIFAR_VALUES = 3 * _CIFAR_SIDE * _CIFAR_SIDE


def _cifar_layout(root: Path) -> _CifarLayout:
    """Which CIFAR a folder holds, after checking all its files are there."""
    layout = next(
        (lay for lay in (_CIFAR10, _CIFAR100) if any((root / f).is_file() for f in lay.files())),
        None,
    )
    if layout is None:
        inner = [d for d in ("cifar-10-batches-py", "cifar-100-python") if (root / d).is_dir()]
        hint = (
            f"did you mean data.path: {root / inner[0]}?"
            if inner
            else "point data.path at the extracted python version"
        )
        raise ConvpipeError(
            "no CIFAR files: expected data_batch_1..5, test_batch, batches.meta (CIFAR-10) "
            "or train, test, meta (CIFAR-100)",
            f"in {root}",
            hint,
        )
    missing = [f for f in layout.files() if not (root / f).is_file()]
    if missing:
        raise ConvpipeError(
            f"incomplete {layout.kind} folder: missing {', '.join(missing)}",
            f"in {root}",
            "re-extract the python version of the dataset",
        )
    return layout


def _load_dict(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as fh:
            batch = restricted_load(fh, str(path))
    except OSError as exc:
        raise ConvpipeError(
            f"cannot read CIFAR file: {exc.strerror or exc}", f"in {path}", "check it is readable"
        ) from None
    if not isinstance(batch, dict):
        raise ConvpipeError(
            f"expected a pickled dict, got {type(batch).__name__}",
            f"in {path}",
            "is this a CIFAR python batch?",
        )
    return batch


def _entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    # The original batches were pickled by Python 2 (bytes keys); re-pickled copies made
    # with Python 3 have str keys. Both hold the same data.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ConvpipeError(
        f"CIFAR file has no '{key}' entry", f"in {path}", "is this the right CIFAR variant?"
    )


def _cifar_names(path: Path, key: str) -> list[str]:
    names = _entry(_load_dict(path), key, path)
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise ConvpipeError(
            f"'{key}' is not a list of class names", f"in {path}", "re-extract the dataset"
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _flat_labels(raw: Any, count: int, layout: _CifarLayout, path: Path) -> np.ndarray:
    """``raw`` as an array, once its structure is known to be one integer per image.

    Checked before ``np.asarray``: a crafted pickle can nest references to one list inside
    another (a few bytes each) so that converting it would build billions of elements.
    """
    flat = isinstance(raw, list) and len(raw) == count and all(type(x) is int for x in raw)
    if flat or (isinstance(raw, np.ndarray) and raw.ndim == 1 and len(raw) == count):
        return np.asarray(raw)
    got = f"{raw.dtype} {raw.shape}" if isinstance(raw, np.ndarray) else _describe(raw)
    raise ConvpipeError(
        f"'{layout.label_key}' must hold {count} integers (one per image), got {got}",
        f"in {path}",
        "re-extract the dataset",
    )


def _describe(raw: Any) -> str:
    if not isinstance(raw, list):
        return type(raw).__name__
    odd = next((x for x in raw if type(x) is not int), None)
    inner = f", an element is a {type(odd).__name__}" if odd is not None else ""
    return f"a list of {len(raw)}{inner}"


def _cifar_batch(
    path: Path, layout: _CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` (a strided view) and labels ``(N,)`` of one batch file."""
    batch = _load_dict(path)
    data = _entry(batch, "data", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_VALUES
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConvpipeError(
            f"'data' must be an (N, {_CIFAR_VALUES}) uint8 array, got {got}",
            f"in {path}",
            "re-extract the dataset",
        )
    labels = _flat_labels(_entry(batch, layout.label_key, path), len(data), layout, path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(data):
        raise ConvpipeError(
            f"'{layout.label_key}' must hold {len(data)} integers (one per image), "
            f"got {labels.dtype} {labels.shape}",
            f"in {path}",
            "re-extract the dataset",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConvpipeError(
            f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}",
            f"in {path}",
            "the batch and the meta file come from different datasets",
        )
    # Rows are stored channel-major (all red, then green, then blue); images want HWC.
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def open_cifar(path: str) -> RawDataset:
    """The python version of CIFAR-10 or CIFAR-100, detected from the file names.

    CIFAR-10 has ``data_batch_1..5``, ``test_batch`` and ``batches.meta``; CIFAR-100 has
    ``train``, ``test`` and ``meta`` (its fine labels are used).

    Every file is read through :func:`~convpipe.data.safe_pickle.restricted_load`.

    Args:
        path: The extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``).

    Returns:
        Splits ``train`` and ``test`` of 32x32 RGB images.

    Raises:
        ConvpipeError: unknown or incomplete folder, unsafe or broken pickle, bad shapes.
    """
    root = existing(path, "CIFAR folder", want_dir=True)
    layout = _cifar_layout(root)
    class_names = _cifar_names(root / layout.meta, layout.names_key)
    train = [_cifar_batch(root / name, layout, len(class_names)) for name in layout.train]
    test_images, test_labels = _cifar_batch(root / layout.test, layout, len(class_names))
    train_reader = BatchesReader(
        [images for images, _ in train], [str(root / n) for n in layout.train]
    )
    parts: dict[str, Part] = {
        "train": (np.concatenate([labels for _, labels in train]), train_reader),
        "test": (
            test_labels,
            ArrayReader(np.ascontiguousarray(test_images), str(root / layout.test)),
        ),
    }
    return labelled("cifar", class_names, parts)

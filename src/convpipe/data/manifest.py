"""Reading what the prepare and augment stages wrote: the manifest and memory-mapped arrays.

On disk a prepared dataset is a folder with ``<split>_x.npy`` (uint8, ``(N, H, W, C)``),
``<split>_y.npy`` (int64, ``(N,)``) and ``manifest.json``; in ``data.format: litdata`` the
images of a split are a LitData folder ``<split>/`` instead of ``<split>_x.npy``
(:mod:`convpipe.data.streaming`). Everything the data says (classes, channels, image size,
mean/std, format) is read from the manifest and never configured twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from convpipe.config.schema import DataFormat, ResizeMode
from convpipe.data.streaming import INDEX, StreamedImages, item_count
from convpipe.errors import ConvpipeError

MANIFEST = "manifest.json"
PIPELINE_FILE = "pipeline.json"  # the augment stage's saved albumentations pipeline
FORMAT_VERSION = 1


class SplitInfo(BaseModel):
    """One split on disk: its size, class counts and files (relative to the folder).

    ``x`` is the images' ``.npy`` file, or their LitData folder in the ``litdata`` format.
    """

    model_config = ConfigDict(extra="forbid")

    count: int
    per_class: dict[str, int]
    x: str
    y: str


class SkippedInfo(BaseModel):
    """Files prepare skipped under ``data.on_bad_file: skip``, and the report listing them."""

    model_config = ConfigDict(extra="forbid")

    count: int
    report: str


class Manifest(BaseModel):
    """What a prepared (or augmented) dataset folder holds."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    stage: str
    source: str
    class_names: list[str]
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    # how images met image_size (data.resize); predict fits new images the same way. A
    # manifest written before the key existed stretched them.
    resize: ResizeMode = "stretch"
    # data.format the images are stored in; a manifest written before the key existed is npy
    format: DataFormat = "npy"
    mean: list[float]
    std: list[float]
    splits: dict[str, SplitInfo]
    skipped: SkippedInfo
    content_hash: str  # of this folder's arrays (see :func:`convpipe.io.content_hash`)

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(height, width)`` of every image."""
        return (int(self.image_size[0]), int(self.image_size[1]))


def images_name(split: str, data_format: DataFormat) -> str:
    """Where a split's images are in a dataset folder: an ``.npy`` file or a LitData folder."""
    return split if data_format == "litdata" else f"{split}_x.npy"


def data_files(folder: Path, splits: dict[str, SplitInfo]) -> list[Path]:
    """The files whose bytes are a dataset folder's identity, split by split: images, labels.

    A LitData split counts by its ``index.json``, which carries the hash of its chunks; an
    empty one (``augment.copies: 0``) has no folder and counts by its labels alone.
    """
    files = []
    for info in splits.values():
        images = folder / info.x
        if images.is_dir():
            images = images / INDEX
        files += [images, folder / info.y] if images.exists() else [folder / info.y]
    return files


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    """Images per class name, every class listed (zero included).

    Args:
        labels: ``(N,)`` integer classes.
        class_names: name of each class index.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    return {name: int(counts[i]) for i, name in enumerate(class_names)}


def load_manifest(folder: str | Path) -> Manifest:
    """Read and validate ``folder/manifest.json``.

    Raises:
        ConvpipeError: when the folder was not written by a compatible prepare/augment stage.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ConvpipeError(
            f"no {MANIFEST} found", f"in {folder}", "run `dvc repro prepare` first"
        ) from None
    except (json.JSONDecodeError, ValidationError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConvpipeError(
            f"{MANIFEST} is not a convpipe manifest ({first})", f"in {folder}", "rerun `dvc repro`"
        ) from None
    if manifest.format_version != FORMAT_VERSION:
        raise ConvpipeError(
            f"manifest format {manifest.format_version}, expected {FORMAT_VERSION}",
            f"in {path}",
            "rerun `dvc repro --force prepare`",
        )
    return manifest


def load_split(folder: str | Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split's images (or open its LitData folder) and load its labels.

    Returns:
        ``(x, y)``: x uint8 ``(N, H, W, C)`` (a read-only memmap, or in the litdata format a
        :class:`~convpipe.data.streaming.StreamedImages` read by index), y int64 ``(N,)``.
    """
    if split not in manifest.splits:
        raise ConvpipeError(
            f"split '{split}' not found (have: {', '.join(manifest.splits)})", f"in {folder}", ""
        )
    info = manifest.splits[split]
    folder = Path(folder)
    y = np.load(folder / info.y, allow_pickle=False)
    h, w = manifest.image_hw
    if manifest.format == "litdata":
        stored = item_count(folder / info.x)
        if stored != info.count or y.shape != (info.count,):
            raise ConvpipeError(
                f"split '{split}' holds {stored} images and {y.shape[0]} labels, the manifest "
                f"says {info.count}",
                f"in {folder}",
                "rerun `dvc repro --force`",
            )
        shape = (info.count, h, w, manifest.channels)
        return StreamedImages(str(folder / info.x), shape), y  # type: ignore[return-value]
    x = np.load(folder / info.x, mmap_mode="r", allow_pickle=False)
    if x.shape != (info.count, h, w, manifest.channels) or y.shape != (info.count,):
        raise ConvpipeError(
            f"split '{split}' arrays have shapes {x.shape} and {y.shape}, the manifest says "
            f"{(info.count, h, w, manifest.channels)}",
            f"in {folder}",
            "rerun `dvc repro --force`",
        )
    return x, y

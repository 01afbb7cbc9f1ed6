"""The augment stage: seeded augmented copies of the train split, the pipeline, a preview.

Only the train split is ever augmented. The output folder mirrors the prepared one (same
array layout and manifest format) so the training loader reads both the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convpipe.config.schema import Params
from convpipe.data.manifest import (
    MANIFEST,
    PIPELINE_FILE,
    Manifest,
    SplitInfo,
    class_counts,
    data_files,
    images_name,
    load_manifest,
    load_split,
)
from convpipe.data.streaming import ShardWriter
from convpipe.data.transforms.apply import augment_batches
from convpipe.data.transforms.factory import build_augmentation, save_augmentation
from convpipe.data.transforms.preview import preview_grid, save_png
from convpipe.io import atomic_dir, content_hash, create_npy

PREVIEW_VERSIONS = 4


def preview_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """Positions of ``count`` images to preview, cycling through the classes in order.

    Args:
        labels: ``(N,)`` class of each train image.
        count: how many to pick (fewer if the split is smaller).
    """
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < min(count, labels.size):
        for members in by_class:
            if members and len(picked) < count:
                picked.append(members.pop(0))
    return np.asarray(picked, dtype=np.int64)


def write_augmented(params: Params) -> Manifest:
    """Write ``augment.copies`` augmented copies of the prepared train split, and the preview.

    Returns:
        The manifest of the augmented folder.
    """
    prepared = load_manifest(params.paths.prepared)
    x, y = load_split(params.paths.prepared, prepared, "train")
    seed = params.base.seed
    transform = build_augmentation(params.augment, prepared.image_hw, prepared.channels, seed)
    copies = params.augment.copies
    labels = np.tile(np.asarray(y), copies)
    with atomic_dir(params.paths.augmented) as tmp:
        chunks = augment_batches(x, transform, copies, params.data.chunk_size)
        if prepared.format == "litdata":
            _write_litdata(tmp, chunks, labels)
        else:
            _write_npy(tmp, chunks, labels, prepared)
        np.save(tmp / "train_y.npy", labels.astype(np.int64), allow_pickle=False)
        save_augmentation(transform, tmp / PIPELINE_FILE)
        train = SplitInfo(
            count=int(labels.size),
            per_class=class_counts(labels, prepared.class_names),
            x=images_name("train", prepared.format),
            y="train_y.npy",
        )
        manifest = prepared.model_copy(
            update={
                "stage": "augment",
                "content_hash": content_hash(data_files(tmp, {"train": train})),
                "splits": {"train": train},
            }
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _write_preview(params, prepared, x, np.asarray(y))
    return manifest


def _write_npy(
    folder: Path, chunks: Iterator[np.ndarray], labels: np.ndarray, prepared: Manifest
) -> None:
    """The augmented copies as ``folder/train_x.npy``, a chunk at a time."""
    h, w = prepared.image_hw
    out = create_npy(
        folder / "train_x.npy", dtype=np.uint8, shape=(labels.size, h, w, prepared.channels)
    )
    start = 0
    for chunk in chunks:
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
    out.flush()
    del out


def _write_litdata(folder: Path, chunks: Iterator[np.ndarray], labels: np.ndarray) -> None:
    """The augmented copies as the LitData folder ``folder/train/``, in order (none: no folder)."""
    if labels.size == 0:
        return
    writer = ShardWriter(folder / "train")
    start = 0
    for chunk in chunks:
        writer.write(chunk, labels[start : start + len(chunk)])
        start += len(chunk)
    writer.close()


def _write_preview(params: Params, prepared: Manifest, x: np.ndarray, y: np.ndarray) -> None:
    """Save originals beside freshly augmented versions as one PNG grid."""
    # its own seed, so the preview never shifts the random stream of the saved copies
    transform = build_augmentation(
        params.augment, prepared.image_hw, prepared.channels, params.base.seed + 1
    )
    picks = np.asarray(x[preview_indices(y, params.augment.preview_count)])
    versions = [
        np.stack([transform(image=img)["image"] for img in picks]) for _ in range(PREVIEW_VERSIONS)
    ]
    Path(params.paths.augment_preview).parent.mkdir(parents=True, exist_ok=True)
    save_png(preview_grid(picks, versions), params.paths.augment_preview)

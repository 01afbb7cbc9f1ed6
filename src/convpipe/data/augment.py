"""The augment stage: seeded augmented copies of the train split, the pipeline, a preview.

Only the train split is ever augmented. The output folder mirrors the prepared one (same
array layout and manifest format) so the training loader reads both the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convpipe.config.schema import Params
from convpipe.data.manifest import (
    MANIFEST,
    PIPELINE_FILE,
    Manifest,
    SplitInfo,
    class_counts,
    content_hash,
    load_manifest,
    load_split,
)
from convpipe.data.transforms.apply import augment_batches
from convpipe.data.transforms.factory import build_augmentation, save_augmentation
from convpipe.data.transforms.preview import preview_grid, save_png
from convpipe.io import atomic_dir, create_npy

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
    h, w = prepared.image_hw
    with atomic_dir(params.paths.augmented) as tmp:
        out = create_npy(
            tmp / "train_x.npy",
            dtype=np.uint8,
            shape=(labels.size, h, w, prepared.channels),
        )
        start = 0
        for chunk in augment_batches(x, transform, copies, params.data.chunk_size):
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        del out
        np.save(tmp / "train_y.npy", labels.astype(np.int64), allow_pickle=False)
        save_augmentation(transform, tmp / PIPELINE_FILE)
        manifest = prepared.model_copy(
            update={
                "stage": "augment",
                "content_hash": content_hash([tmp / "train_x.npy", tmp / "train_y.npy"]),
                "splits": {
                    "train": SplitInfo(
                        count=int(labels.size),
                        per_class=class_counts(labels, prepared.class_names),
                        x="train_x.npy",
                        y="train_y.npy",
                    )
                },
            }
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _write_preview(params, prepared, x, np.asarray(y))
    return manifest


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

"""Applying an albumentations pipeline with numpy: one image, or offline over a dataset.

The augment stage writes its copies with :func:`augment_batches`; online training falls back to
:func:`augment_image` per image when the batched tensor path cannot express a pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from albumentations.core.composition import BaseCompose

from convpipe.errors import ConvpipeError


def check_images(images: np.ndarray | torch.Tensor, name: str = "images") -> None:
    """Raise ValueError unless ``images`` is uint8 ``(N, H, W, C)`` with C in (1, 3)."""
    uint8 = torch.uint8 if isinstance(images, torch.Tensor) else np.uint8
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != uint8:
        raise ValueError(
            f"{name} must be uint8 (N, H, W, C) with C = 1 or 3, "
            f"got {images.dtype} {tuple(images.shape)}"
        )


def augment_image(transform: BaseCompose, image: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to one uint8 ``(H, W, C)`` image.

    Args:
        transform: An albumentations pipeline.
        image: uint8 ``(H, W, C)``; may be a read-only view (it is copied first).

    Returns:
        A new uint8 ``(H, W, C)`` array.

    Raises:
        ConvpipeError: If the pipeline changes the image size (built for other data).
    """
    # A private writable, contiguous copy: the input may be a read-only memmap row.
    source = np.array(image, dtype=np.uint8, copy=True, order="C")
    out = transform(image=source)["image"]
    if out.ndim == 2:
        # Some OpenCV ops drop a trailing channel of size 1; the data contract keeps it.
        out = out[..., np.newaxis]
    if out.shape != source.shape:
        raise ConvpipeError(
            f"augmentation turned a {source.shape} image into {out.shape}",
            "",
            "rebuild the pipeline for this data (dvc repro augment)",
        )
    return np.asarray(out, dtype=np.uint8)


def augment_batches(
    images: np.ndarray, transform: BaseCompose, copies: int, chunk_size: int
) -> Iterator[np.ndarray]:
    """Yield ``copies`` augmented copies of every image, in chunks of at most ``chunk_size``.

    Order is copy-major: copy 0 of images ``0..N-1``, then copy 1, and so on, so the labels
    of the concatenated output are ``np.tile(labels, copies)``. Chunks may straddle copies.
    The output depends only on the pipeline's random state (not on ``chunk_size``): a
    pipeline freshly built or loaded with the same seed yields the same bytes. Only one
    chunk is held at a time, so memory is ``O(chunk_size * H * W * C)``.

    Args:
        images: uint8 ``(N, H, W, C)``, e.g. a read-only ``np.memmap``.
        transform: The pipeline; its random stream advances as images are produced.
        copies: Number of augmented copies (0 yields nothing).
        chunk_size: Maximum images per yielded chunk (> 0).

    Yields:
        uint8 ``(n, H, W, C)`` chunks with ``1 <= n <= chunk_size``; ``N * copies`` in total.

    Raises:
        ValueError: If ``images`` has the wrong dtype/shape, ``copies < 0`` or
            ``chunk_size <= 0``.
    """
    check_images(images)
    if copies < 0 or chunk_size <= 0:
        raise ValueError(f"need copies >= 0 and chunk_size > 0, got {copies} and {chunk_size}")
    count = len(images)
    total = count * copies
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        chunk = np.empty((stop - start, *images.shape[1:]), dtype=np.uint8)
        for row, index in enumerate(range(start, stop)):
            chunk[row] = augment_image(transform, images[index % count])
        yield chunk

"""Previews for people: originals next to their augmented copies in one PNG.

The augment stage writes one (``paths.augment_preview``) so a person can see what the
``augment:`` section of ``params.yaml`` does to the data before training on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from convpipe.data.transforms.apply import check_images
from convpipe.io import atomic_path

#: Preview layout, in output pixels: tiles are upscaled to at least ``PREVIEW_MIN_TILE`` on
#: their short side, separated (and framed) by ``PREVIEW_GAP``, under a ``PREVIEW_HEADER`` band.
PREVIEW_MIN_TILE = 64
PREVIEW_GAP = 4
PREVIEW_HEADER = 16
_BACKGROUND = 255


def preview_scale(image_hw: tuple[int, int]) -> int:
    """Integer upscale factor so the short side of a tile is at least ``PREVIEW_MIN_TILE``."""
    return max(1, math.ceil(PREVIEW_MIN_TILE / min(image_hw)))


def _tile(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of a ``(H, W, C)`` image to RGB ``(H*s, W*s, 3)``."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return np.repeat(big, 3, axis=2) if big.shape[2] == 1 else big


def _draw_headers(grid: np.ndarray, titles: Sequence[str], tile_width: int) -> np.ndarray:
    """Write each column's title into the header band with PIL's built-in font."""
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, title in enumerate(titles):
        x = PREVIEW_GAP + col * (tile_width + PREVIEW_GAP)
        draw.text((x, 2), title, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def preview_grid(
    originals: np.ndarray, augmented: Sequence[np.ndarray], *, headers: bool = True
) -> np.ndarray:
    """Lay originals and their augmented versions out as one RGB picture.

    Row ``i`` shows sample ``i``: column 0 the original, column ``j`` ``augmented[j-1][i]``.
    Tiles are upscaled by :func:`preview_scale` with nearest neighbour (tiny 8x8 digits stay
    crisp), grayscale is repeated to RGB, and tiles are separated by ``PREVIEW_GAP`` pixels of
    white. Tile ``(row, col)`` starts at ``y = top + PREVIEW_GAP + row * (h + PREVIEW_GAP)``,
    ``x = PREVIEW_GAP + col * (w + PREVIEW_GAP)``, with ``top = PREVIEW_HEADER`` if
    ``headers`` else 0 and ``(h, w)`` the upscaled tile size.

    Args:
        originals: uint8 ``(N, H, W, C)``.
        augmented: Arrays of the same shape as ``originals``, one per augmented column.
        headers: Draw "original", "aug 1", ... above the columns.

    Returns:
        uint8 RGB ``(H', W', 3)``.

    Raises:
        ValueError: If the arrays are not uint8 ``(N, H, W, C)`` of one shape.
    """
    check_images(originals, "originals")
    for index, array in enumerate(augmented):
        if array.shape != originals.shape or array.dtype != np.uint8:
            raise ValueError(
                f"augmented[{index}] must be uint8 {originals.shape}, "
                f"got {array.dtype} {array.shape}"
            )
    columns = [originals, *augmented]
    count, height, width, _ = originals.shape
    scale = preview_scale((height, width))
    tile_h, tile_w = height * scale, width * scale
    top = PREVIEW_HEADER if headers else 0
    grid = np.full(
        (
            top + count * tile_h + (count + 1) * PREVIEW_GAP,
            len(columns) * tile_w + (len(columns) + 1) * PREVIEW_GAP,
            3,
        ),
        _BACKGROUND,
        dtype=np.uint8,
    )
    for col, array in enumerate(columns):
        x = PREVIEW_GAP + col * (tile_w + PREVIEW_GAP)
        for row in range(count):
            y = top + PREVIEW_GAP + row * (tile_h + PREVIEW_GAP)
            grid[y : y + tile_h, x : x + tile_w] = _tile(array[row], scale)
    if headers:
        titles = ["original", *(f"aug {i}" for i in range(1, len(columns)))]
        grid = _draw_headers(grid, titles, tile_w)
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image as PNG, atomically.

    Raises:
        ValueError: If ``image`` is not one of those shapes or not uint8.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 (H, W[, C]), got {image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] != 3:
        raise ValueError(f"image must have 1 or 3 channels, got {image.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")

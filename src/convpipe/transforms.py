"""The one transforms factory: train-time augmentation and eval-time normalisation.

Images in convpipe are uint8 arrays of shape ``(N, H, W, C)`` with ``C`` = 1 or 3. This module
turns the ``augment:`` section of ``params.yaml`` into an albumentations 2.0.x pipeline that
always returns images of the original ``(H, W, C)``, applies it offline in bounded-memory
chunks (the ``augment`` stage), draws previews for people, and converts batches to normalised
float tensors for the model. Training and evaluation both get their batch transform from
:func:`create_transforms`, so the two sides cannot drift apart.

Randomness (verified against albumentations 2.0.8):

* ``A.Compose(seed=s)`` gives *every* child transform its own ``random.Random(s)`` and
  ``np.random.default_rng(s)``. Children therefore draw identical numbers: with two ``p=0.5``
  flips, both flips always fire together. :func:`seed_augmentation` replaces that with one
  stream shared by the whole pipeline, so sections draw independently and reproducibly.
* The seed is not part of ``A.save`` output, so :func:`load_augmentation` takes it again.
* ``A.GaussNoise`` seeds OpenCV's RNG from the pipeline's numpy generator on every call, so
  noise is reproducible too.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

# albumentations asks PyPI for a newer release when it is imported (a network call with a 2 s
# timeout); convpipe never touches the network at run time, so opt out before importing it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform
from PIL import Image, ImageDraw, ImageFont

from convpipe.config import (
    AffineParams,
    AugmentParams,
    ColorJitterParams,
    CropParams,
    NoiseParams,
    ResizedCropParams,
    RotateParams,
    Toggle,
)
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path

Transform: TypeAlias = BasicTransform | BaseCompose
ImageHW: TypeAlias = tuple[int, int]

#: The ``augment`` sub-sections, in the order their transforms run: geometry first (so
#: photometric changes are not smeared by interpolation), noise last (so it is not blurred).
SECTIONS: tuple[str, ...] = (
    "crop",
    "resized_crop",
    "affine",
    "rotate",
    "horizontal_flip",
    "vertical_flip",
    "color_jitter",
    "gaussian_noise",
)

#: Preview layout, in output pixels: tiles are upscaled to at least ``PREVIEW_MIN_TILE`` on
#: their short side, separated (and framed) by ``PREVIEW_GAP``, under a ``PREVIEW_HEADER`` band.
PREVIEW_MIN_TILE = 64
PREVIEW_GAP = 4
PREVIEW_HEADER = 16
_BACKGROUND = 255


# --------------------------------------------------------------------------- building


def _crop(section: CropParams, hw: ImageHW, channels: int) -> Transform:
    """Pad ``padding`` black pixels on every side, then crop back to ``hw``, as one unit.

    ``A.Pad(padding)`` gives exactly the ``(H + 2p, W + 2p)`` canvas that
    ``A.PadIfNeeded(H + 2p, W + 2p)`` would for same-size images (verified byte-identical), but
    PadIfNeeded in albumentations 2.0.8 serialises a stray ``padding`` key and warns on load.
    """
    height, width = hw
    return A.Sequential(
        [
            A.Pad(padding=section.padding, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=height, width=width),
        ],
        p=section.p,
    )


def _resized_crop(section: ResizedCropParams, hw: ImageHW, channels: int) -> Transform:
    return A.RandomResizedCrop(
        size=hw, scale=tuple(section.scale), ratio=tuple(section.ratio), p=section.p
    )


def _affine(section: AffineParams, hw: ImageHW, channels: int) -> Transform:
    return A.Affine(
        translate_percent=(-section.shift, section.shift),
        scale=tuple(section.scale),
        rotate=(-section.rotate, section.rotate),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        p=section.p,
    )


def _rotate(section: RotateParams, hw: ImageHW, channels: int) -> Transform:
    return A.Rotate(
        limit=(-section.limit, section.limit),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        p=section.p,
    )


def _horizontal_flip(section: Toggle, hw: ImageHW, channels: int) -> Transform:
    return A.HorizontalFlip(p=section.p)


def _vertical_flip(section: Toggle, hw: ImageHW, channels: int) -> Transform:
    return A.VerticalFlip(p=section.p)


def _color_jitter(section: ColorJitterParams, hw: ImageHW, channels: int) -> Transform:
    """``A.ColorJitter`` for both 1 and 3 channels.

    In albumentations 2.0.8 ColorJitter handles (H, W, 1) images correctly: brightness
    multiplies by a factor in ``[1-b, 1+b]``, contrast blends towards the image mean with a
    factor in ``[1-c, 1+c]`` (torchvision semantics, as documented in params.yaml), and
    saturation/hue are skipped. ``A.RandomBrightnessContrast`` is not used: its brightness is
    additive (``beta * 255``) and its contrast scales around 0, not the mean, which would give
    the same keys a different meaning on grayscale data.
    """
    if channels == 1:
        _reject_colour_on_grayscale(section)
    return A.ColorJitter(
        brightness=section.brightness,
        contrast=section.contrast,
        saturation=section.saturation,
        hue=section.hue,
        p=section.p,
    )


def _reject_colour_on_grayscale(section: ColorJitterParams) -> None:
    """Saturation and hue do not exist for one channel: fail instead of silently ignoring."""
    bad = [
        f"augment.color_jitter.{key}={value}"
        for key, value in (("saturation", section.saturation), ("hue", section.hue))
        if value > 0
    ]
    if bad:
        raise ConvpipeError(
            f"{' and '.join(bad)} need RGB images but the data has 1 channel (grayscale)",
            "in the augment section of params.yaml",
            "set augment.color_jitter.saturation and augment.color_jitter.hue to 0, "
            "or use data.channels: 3 to convert the images to RGB",
        )


def _gaussian_noise(section: NoiseParams, hw: ImageHW, channels: int) -> Transform:
    """Noise with a standard deviation drawn from ``std``, a fraction of 255 for uint8.

    albumentations adds the float noise to uint8 pixels truncating towards zero, so the
    effective standard deviation is slightly smaller (e.g. ~2.2 instead of 2.55 for 0.01).
    """
    return A.GaussNoise(std_range=tuple(section.std), p=section.p)


_BUILDERS: dict[str, Callable[[Any, ImageHW, int], Transform]] = {
    "crop": _crop,
    "resized_crop": _resized_crop,
    "affine": _affine,
    "rotate": _rotate,
    "horizontal_flip": _horizontal_flip,
    "vertical_flip": _vertical_flip,
    "color_jitter": _color_jitter,
    "gaussian_noise": _gaussian_noise,
}


def _build_section(name: str, section: Toggle, hw: ImageHW, channels: int) -> Transform:
    """Build one section, turning albumentations' own range checks into a user error."""
    try:
        return _BUILDERS[name](section, hw, channels)
    except ValueError as exc:
        # albumentations re-raises its pydantic errors as ValueError(str(error)).
        raise ConvpipeError(
            f"augment.{name} is invalid: {_first_problem(str(exc))}",
            "in the augment section of params.yaml",
            "fix the value",
        ) from None


def _first_problem(message: str) -> str:
    """``"scale: First value should be ..."`` from a multi-line pydantic error text."""
    folded = " ".join(message.split())
    found = re.search(r"for \w+ (\w+) (?:Value error, )?(.*?)(?: \[type=|$)", folded)
    return f"{found.group(1)}: {found.group(2)}" if found else folded


def build_augmentation(
    params: AugmentParams, image_hw: tuple[int, int], channels: int, seed: int
) -> A.Compose:
    """Build the seeded train-time augmentation pipeline from ``params.yaml``'s augment section.

    Every section with ``p > 0`` contributes one transform (in :data:`SECTIONS` order) applied
    with its own probability; sections with ``p == 0`` are left out entirely. Every transform
    keeps the image size, so the pipeline maps a uint8 ``(H, W, C)`` image to ``(H, W, C)``.

    Args:
        params: The validated ``augment`` section.
        image_hw: ``(H, W)`` of every image in the dataset.
        channels: ``C``, 1 (grayscale) or 3 (RGB).
        seed: Seeds the pipeline's single random stream (see :func:`seed_augmentation`).

    Returns:
        An ``A.Compose``; call it as ``pipeline(image=img)["image"]``.

    Raises:
        ConvpipeError: If a section asks for something the data cannot have (saturation or hue
            on grayscale) or a range is invalid (e.g. ``resized_crop.scale`` decreasing).
        ValueError: If ``channels`` is not 1 or 3 or ``image_hw`` is not positive.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_hw must be positive, got {image_hw}")
    transforms = [
        _build_section(name, getattr(params, name), (height, width), channels)
        for name in SECTIONS
        if getattr(params, name).p > 0
    ]
    pipeline = A.Compose(transforms, seed=seed)
    seed_augmentation(pipeline, seed)
    return pipeline


def seed_augmentation(transform: BaseCompose, seed: int) -> None:
    """Give the whole pipeline one random stream seeded with ``seed``.

    ``A.Compose(seed=...)`` alone seeds each child with the *same* seed, so children draw
    identical numbers (two ``p=0.5`` flips always fire together). Sharing one
    ``np.random.Generator`` and one ``random.Random`` makes the draws independent while the
    whole sequence stays a pure function of ``seed``, in any process. Call it again to restart
    the stream, e.g. after :func:`load_augmentation` or in a DataLoader worker.

    Args:
        transform: A ``Compose`` (or any albumentations composition).
        seed: Non-negative integer seed.
    """
    transform.set_random_seed(seed)  # records .seed on every node for introspection
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


# --------------------------------------------------------------------------- serialisation


def save_augmentation(transform: A.Compose, path: str | os.PathLike[str]) -> None:
    """Write ``transform`` as albumentations JSON (``A.save``), atomically.

    The seed is not serialised by albumentations; record it elsewhere (e.g. the stage
    manifest) and pass it to :func:`load_augmentation`.

    Args:
        transform: The pipeline from :func:`build_augmentation`.
        path: Target file, usually ``<paths.augmented>/pipeline.json``.
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        # A file handle (not a path) makes albumentations indent the JSON: readable diffs.
        A.save(transform, fh, data_format="json")


def load_augmentation(path: str | os.PathLike[str], seed: int) -> A.Compose:
    """Read a pipeline written by :func:`save_augmentation` and re-apply ``seed``.

    With the seed used at build time, the reloaded pipeline produces byte-identical outputs
    to a freshly built one.

    Args:
        path: The JSON file.
        seed: The seed to restart the pipeline's random stream with.

    Returns:
        The ``A.Compose`` pipeline.

    Raises:
        ConvpipeError: If the file is missing or is not an albumentations Compose pipeline.
    """
    todo = "re-run the augment stage (dvc repro augment)"
    try:
        transform = A.load(str(path), data_format="json")
    except FileNotFoundError:
        raise ConvpipeError(f"augmentation pipeline not found: {path}", "", todo) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConvpipeError(
            f"cannot read augmentation pipeline: {type(exc).__name__}: {exc}", f"in {path}", todo
        ) from None
    if not isinstance(transform, A.Compose):
        raise ConvpipeError(
            f"expected an albumentations Compose, got {type(transform).__name__}",
            f"in {path}",
            todo,
        )
    seed_augmentation(transform, seed)
    return transform


# --------------------------------------------------------------------------- applying


def _check_images(images: np.ndarray, name: str = "images") -> None:
    """Raise ValueError unless ``images`` is uint8 ``(N, H, W, C)`` with C in (1, 3)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
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
    _check_images(images)
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


# --------------------------------------------------------------------------- previews


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
    _check_images(originals, "originals")
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


# --------------------------------------------------------------------------- model input


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn uint8 ``(N, H, W, C)`` images into normalised float32 ``(N, C, H, W)``.

    Computes ``(x / 255 - mean[c]) / std[c]`` per channel on ``images``' device.

    Args:
        images: uint8 tensor ``(N, H, W, C)``.
        mean: Per-channel mean of the ``[0, 1]``-scaled training images, length ``C``.
        std: Per-channel standard deviation, length ``C``, all > 0.

    Returns:
        Contiguous float32 tensor ``(N, C, H, W)``.

    Raises:
        ValueError: On a wrong dtype/rank, a length mismatch or a non-positive ``std``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 (N, H, W, C) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    channels = images.shape[-1]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(
            f"need {channels} mean and {channels} positive std values, got {list(mean)} "
            f"and {list(std)}"
        )
    shape = (1, channels, 1, 1)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=images.device).view(shape)
    scaled = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return ((scaled - mean_t) / std_t).contiguous()


class BatchTransform:
    """What the model sees: optional augmentation, then :func:`normalize_batch`.

    Call it on a uint8 ``(N, H, W, C)`` batch (tensor or array) to get float32
    ``(N, C, H, W)``. Augmentation runs per image on CPU numpy; with no augmentation the
    input tensor's device is kept. Inside a DataLoader worker the pipeline is reseeded from
    the worker's seed the first time it runs there: otherwise every worker (and, with
    non-persistent workers, every epoch) would replay the same copy of the random stream.

    Attributes:
        augmentation: The albumentations pipeline, or None for evaluation.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
        seed: Base seed mixed into worker reseeding.
    """

    def __init__(
        self,
        augmentation: BaseCompose | None,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        self.augmentation = augmentation
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.seed = seed
        self._worker_seed: int | None = None

    @property
    def train(self) -> bool:
        """Whether this transform augments (the training side)."""
        return self.augmentation is not None

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Augment (if training) and normalise a uint8 ``(N, H, W, C)`` batch."""
        if self.augmentation is not None:
            array = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
            images = torch.from_numpy(self._augment(self.augmentation, np.asarray(array)))
        elif isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        return normalize_batch(images, self.mean, self.std)

    def _augment(self, augmentation: BaseCompose, batch: np.ndarray) -> np.ndarray:
        _check_images(batch)
        self._reseed_in_new_worker(augmentation)
        out = np.empty_like(batch)
        for index, image in enumerate(batch):
            out[index] = augment_image(augmentation, image)
        return out

    def _reseed_in_new_worker(self, augmentation: BaseCompose) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        self._worker_seed = info.seed
        # torch derives info.seed from the (seeded) main RNG per worker and per epoch.
        mixed = np.random.SeedSequence([self.seed, info.seed]).generate_state(1)[0]
        seed_augmentation(augmentation, int(mixed))


def create_transforms(
    aug: AugmentParams | None,
    image_hw: tuple[int, int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    train: bool,
) -> BatchTransform:
    """The single entry point for the model-side transform of training and evaluation.

    Training batches are augmented online only if ``train`` is true, ``aug`` is given and
    ``aug.online`` is set (offline copies come from the augment stage instead); evaluation
    batches are only normalised. Both sides normalise with the same ``mean``/``std``.

    Args:
        aug: The ``augment`` section, or None for no augmentation.
        image_hw: ``(H, W)`` of the images.
        channels: 1 or 3.
        mean: Per-channel mean of the ``[0, 1]``-scaled training images.
        std: Per-channel standard deviation.
        seed: Seeds the online augmentation stream.
        train: True for the training side.

    Returns:
        A :class:`BatchTransform` mapping uint8 ``(N, H, W, C)`` to float32 ``(N, C, H, W)``.
    """
    augmentation = None
    if train and aug is not None and aug.online:
        augmentation = build_augmentation(aug, image_hw, channels, seed)
    return BatchTransform(augmentation, mean, std, seed)

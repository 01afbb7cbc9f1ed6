"""The one transforms factory: train-time augmentation and eval-time normalisation.

Images in convpipe are uint8 arrays of shape ``(N, H, W, C)`` with ``C`` = 1 or 3. This module
turns the ``augment:`` section of ``params.yaml`` into an albumentations 2.0.x pipeline that
always returns images of the original ``(H, W, C)``, applies it offline in bounded-memory
chunks (the ``augment`` stage), draws previews for people, and converts batches to normalised
float tensors for the model. Training and evaluation both get their batch transform from
:func:`create_transforms`, so the two sides cannot drift apart.

Online augmentation runs the same pipeline as batched tensor ops (:class:`TensorAugmentation`:
one ``grid_sample`` per geometric transform for the whole batch, masked per-image random
parameters drawn from the distributions albumentations draws them from). On 2 cores the shipped
pipeline costs ~100 µs per 28x28 image through albumentations, image by image (training the
default CNN ~30 % slower), and ~13 µs batched (benchmarks/bench_augment.py). A pipeline with a
transform or an option the tensor path does not know falls back to albumentations, per image.

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
import torch.nn.functional as F
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


# --------------------------------------------------------------------------- batched (online)

#: ``padding_mode`` of ``grid_sample`` for an albumentations border: black or edge pixels.
_ZEROS, _BORDER = "zeros", "border"
#: ITU-R 601 luma, what ``cv2.COLOR_RGB2GRAY`` computes for albumentations' colour transforms.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(
    generator: torch.Generator,
    count: int,
    bounds: Sequence[float],
    shape: tuple[int, ...] = (),
) -> torch.Tensor:
    """float64 ``(count, *shape)`` uniform in ``[low, high)``, like ``random.uniform``."""
    low, high = (float(v) for v in bounds)
    draw = torch.rand((count, *shape), generator=generator, dtype=torch.float64)
    return low + (high - low) * draw


def _warp(images: torch.Tensor, forward: torch.Tensor, padding: str) -> torch.Tensor:
    """Resample ``images`` under pixel-space affine maps, as ``cv2.warpAffine`` does.

    Args:
        images: float ``(N, C, H, W)``.
        forward: float64 ``(N, 3, 3)`` maps from source to destination pixel coordinates, pixel
            centres at integers (OpenCV's and albumentations' convention).
        padding: ``"zeros"`` (black border) or ``"border"`` (edge pixels repeated).

    Returns:
        float ``(N, C, H, W)``, bilinear samples at ``forward⁻¹(x, y)`` of every output pixel.
    """
    count, channels, height, width = images.shape
    # grid_sample (align_corners=False) puts pixel x's centre at u = (2x + 1) / W - 1.
    to_unit = torch.tensor(
        [[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
        dtype=torch.float64,
    )
    theta = to_unit @ torch.linalg.inv(forward) @ torch.linalg.inv(to_unit)
    grid = F.affine_grid(
        theta[:, :2].to(images.dtype), [count, channels, height, width], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _affine_matrices(
    hw: ImageHW,
    translate: tuple[torch.Tensor, torch.Tensor],
    scale: tuple[torch.Tensor, torch.Tensor],
    degrees: torch.Tensor,
) -> torch.Tensor:
    """Batched ``create_affine_transformation_matrix`` of albumentations, without shear.

    Scale, then rotate (counter-clockwise for positive degrees, as on screen) about the image
    centre ``(W/2 - 0.5, H/2 - 0.5)``, then translate by ``translate`` pixels.

    Returns:
        float64 ``(N, 3, 3)`` source-to-destination pixel maps.
    """
    height, width = hw
    centre = torch.tensor([width / 2 - 0.5, height / 2 - 0.5], dtype=torch.float64)
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    matrices = torch.zeros((degrees.shape[0], 3, 3), dtype=torch.float64)
    matrices[:, 0, 0], matrices[:, 0, 1] = cos * scale[0], sin * scale[1]
    matrices[:, 1, 0], matrices[:, 1, 1] = -sin * scale[0], cos * scale[1]
    linear = matrices[:, :2, :2]
    offset = centre - linear @ centre + torch.stack(translate, dim=1)
    matrices[:, :2, 2] = offset
    matrices[:, 2, 2] = 1.0
    return matrices


def _check_size(name: str, size: Sequence[int], hw: ImageHW) -> None:
    """Refuse a crop built for other images, like :func:`augment_image` does."""
    if tuple(int(v) for v in size) != tuple(hw):
        raise ConvpipeError(
            f"{name} makes {tuple(size)} images but the data is {tuple(hw)}",
            "",
            "rebuild the pipeline for this data (dvc repro augment)",
        )


class _BatchedOp:
    """One albumentations transform as a batched op on float ``(N, C, H, W)`` in ``[0, 255]``.

    Every image fires independently with probability ``p``; only the images that fire are
    touched, each with its own random parameters.
    """

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fires = torch.rand(images.shape[0], generator=generator) < self.p
        chosen = fires.nonzero().flatten()
        if chosen.numel():
            images[chosen] = self.apply(images[chosen], generator)
        return images

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Transform every image of ``images`` (float ``(n, C, H, W)``)."""
        raise NotImplementedError


class _Geometric(_BatchedOp):
    """A transform that is one affine resampling per image."""

    padding = _ZEROS

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hw = (images.shape[2], images.shape[3])
        return _warp(images, self.matrices(images.shape[0], hw, generator), self.padding)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        """float64 ``(count, 3, 3)`` source-to-destination maps."""
        raise NotImplementedError


class _PadCrop(_Geometric):
    """``A.Pad`` (black) then ``A.RandomCrop`` back to the size: a random whole-pixel shift."""

    def __init__(self, p: float, pads: tuple[int, int, int, int], size: tuple[int, int]) -> None:
        super().__init__(p)
        self.left, self.top, self.right, self.bottom = pads
        self.size = size

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        _check_size("augment.crop", self.size, hw)
        # RandomCrop: offset = int((padded - size + 1) * U[0, 1)), uniform over the positions
        dy = torch.floor(_uniform(generator, count, (0, 1)) * (self.top + self.bottom + 1))
        dx = torch.floor(_uniform(generator, count, (0, 1)) * (self.left + self.right + 1))
        ones = torch.ones(count, dtype=torch.float64)
        shift = (self.left - dx, self.top - dy)
        return _affine_matrices(hw, shift, (ones, ones), torch.zeros(count, dtype=torch.float64))


class _ResizedCrop(_Geometric):
    """``A.RandomResizedCrop``: torchvision's area/aspect sampling (10 tries, then centre)."""

    # cv2.resize repeats the crop's edge pixels; here the image's edge pixels are repeated,
    # and inside the image the half pixel beyond the crop edge blends in the pixel next to it
    padding = _BORDER

    def __init__(self, transform: A.RandomResizedCrop) -> None:
        super().__init__(transform.p)
        self.size = tuple(transform.size)
        self.scale = tuple(float(v) for v in transform.scale)
        self.ratio = tuple(float(v) for v in transform.ratio)

    def crop_sizes(
        self, count: int, hw: ImageHW, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop heights, widths, and whether no try of 10 fitted (crop centred), ``(count,)``."""
        height, width = hw
        area = _uniform(generator, count, [s * height * width for s in self.scale], (10,))
        logs = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(_uniform(generator, count, logs, (10,)))
        crop_w = torch.round(torch.sqrt(area * aspect))
        crop_h = torch.round(torch.sqrt(area / aspect))
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
        crop_h, crop_w = crop_h.gather(1, first)[:, 0], crop_w.gather(1, first)[:, 0]
        # the fallback: the largest centred crop within the allowed aspect ratios
        in_ratio = width / height
        fallback_h, fallback_w = float(height), float(width)
        if in_ratio < self.ratio[0]:
            fallback_h = float(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fallback_w = float(round(height * self.ratio[1]))
        none_fit = ~fits.any(dim=1)
        crop_h[none_fit], crop_w[none_fit] = fallback_h, fallback_w
        return crop_h, crop_w, none_fit

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        _check_size("augment.resized_crop", self.size, hw)
        height, width = hw
        crop_h, crop_w, centred = self.crop_sizes(count, hw, generator)
        top = torch.floor((height - crop_h + 1) * _uniform(generator, count, (0, 1)))
        left = torch.floor((width - crop_w + 1) * _uniform(generator, count, (0, 1)))
        top = torch.where(centred, (height - crop_h) // 2, top)
        left = torch.where(centred, (width - crop_w) // 2, left)
        # cv2.resize (linear) samples source x = (x' + 0.5) * crop_w / W - 0.5 + left
        sx, sy = width / crop_w, height / crop_h
        matrices = torch.zeros((count, 3, 3), dtype=torch.float64)
        matrices[:, 0, 0], matrices[:, 1, 1], matrices[:, 2, 2] = sx, sy, 1.0
        matrices[:, 0, 2] = (0.5 - left) * sx - 0.5
        matrices[:, 1, 2] = (0.5 - top) * sy - 0.5
        return matrices


class _Affine(_Geometric):
    """``A.Affine`` without shear: per-axis shift, per-axis (or kept-ratio) zoom, rotation."""

    def __init__(self, transform: A.Affine) -> None:
        super().__init__(transform.p)
        self.scale = transform.scale
        self.keep_ratio = bool(transform.keep_ratio)
        self.rotate = tuple(float(v) for v in transform.rotate)
        self.percent = transform.translate_percent
        self.pixels = transform.translate_px

    def _shift(self, axis: str, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
        if self.pixels is not None:
            low, high = (int(v) for v in self.pixels[axis])
            # random.randint includes both ends
            return torch.floor(_uniform(generator, count, (low, high + 1)))
        # int(uniform(...) * size): truncated towards zero
        return torch.trunc(_uniform(generator, count, self.percent[axis]) * size)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        height, width = hw
        shift = (
            self._shift("x", count, width, generator),
            self._shift("y", count, height, generator),
        )
        zoom_x = _uniform(generator, count, self.scale["x"])
        zoom_y = zoom_x if self.keep_ratio else _uniform(generator, count, self.scale["y"])
        degrees = _uniform(generator, count, self.rotate)
        return _affine_matrices(hw, shift, (zoom_x, zoom_y), degrees)


class _Rotate(_Geometric):
    """``A.Rotate`` (``crop_border=False``): a rotation about the centre, black corners."""

    def __init__(self, transform: A.Rotate) -> None:
        super().__init__(transform.p)
        self.limit = tuple(float(v) for v in transform.limit)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        zeros, ones = (torch.full((count,), v, dtype=torch.float64) for v in (0.0, 1.0))
        degrees = _uniform(generator, count, self.limit)
        return _affine_matrices(hw, (zeros, zeros), (ones, ones), degrees)


class _Flip(_BatchedOp):
    """``A.HorizontalFlip`` (``dim=-1``) or ``A.VerticalFlip`` (``dim=-2``)."""

    def __init__(self, p: float, dim: int) -> None:
        super().__init__(p)
        self.dim = dim

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images.flip(self.dim)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """``(n, 1, H, W)`` gray version of ``(n, C, H, W)`` images (themselves when C = 1)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images * factor.view(-1, 1, 1, 1)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards each image's mean gray level (torchvision semantics)."""
    mean = _luma(images).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    factor = factor.view(-1, 1, 1, 1)
    return images * factor + mean * (1 - factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the gray image; nothing to do on one channel."""
    if images.shape[1] == 1:
        return images
    factor = factor.view(-1, 1, 1, 1)
    return images * factor + _luma(images) * (1 - factor)


def _hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (HSV round trip); nothing to do on one channel."""
    if images.shape[1] == 1:
        return images
    rgb = images / 255.0
    high, low = rgb.max(dim=1).values, rgb.min(dim=1).values
    delta = high - low
    red, green, blue = rgb.unbind(dim=1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        high == red,
        (green - blue) / safe,
        torch.where(high == green, 2 + (blue - red) / safe, 4 + (red - green) / safe),
    )
    hue = torch.remainder(hue / 6 + shift.view(-1, 1, 1).to(hue.dtype), 1.0)
    saturation = torch.where(high > 0, delta / torch.where(high > 0, high, 1), 0)
    sector = hue * 6
    index = torch.floor(sector).long() % 6
    frac = sector - torch.floor(sector)
    p = high * (1 - saturation)
    q = high * (1 - saturation * frac)
    t = high * (1 - saturation * (1 - frac))
    # (r, g, b) per sector 0..5 of the hue circle
    table = torch.stack(
        [
            torch.stack(c, dim=1)
            for c in (
                (high, t, p),
                (q, high, p),
                (p, high, t),
                (p, q, high),
                (t, p, high),
                (high, p, q),
            )
        ],
        dim=1,
    )  # (n, 6, 3, H, W)
    pick = index[:, None, None].expand(-1, 1, 3, -1, -1)
    return table.gather(1, pick)[:, 0] * 255.0


class _ColorJitter(_BatchedOp):
    """``A.ColorJitter``: brightness, contrast, saturation, hue, in a random order per image."""

    def __init__(self, transform: A.ColorJitter) -> None:
        super().__init__(transform.p)
        self.ranges = [
            tuple(float(v) for v in getattr(transform, name))
            for name in ("brightness", "contrast", "saturation", "hue")
        ]
        self.ops = (_brightness, _contrast, _saturation, _hue)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = images.shape[0]
        factors = [_uniform(generator, count, bounds).float() for bounds in self.ranges]
        order = torch.rand((count, 4), generator=generator).argsort(dim=1)
        for position in range(4):
            for index, op in enumerate(self.ops):
                chosen = (order[:, position] == index).nonzero().flatten()
                if chosen.numel():
                    changed = op(images[chosen], factors[index][chosen])
                    # albumentations' uint8 ops saturate after every step
                    images[chosen] = changed.clamp(0, 255)
        return images


class _GaussNoise(_BatchedOp):
    """``A.GaussNoise``: per-pixel normal noise, its std (and mean) drawn per image."""

    def __init__(self, transform: A.GaussNoise) -> None:
        super().__init__(transform.p)
        self.std = tuple(float(v) for v in transform.std_range)
        self.mean = tuple(float(v) for v in transform.mean_range)
        self.per_channel = bool(transform.per_channel)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, channels, height, width = images.shape
        sigma = _uniform(generator, count, self.std).float().view(-1, 1, 1, 1) * 255
        mean = _uniform(generator, count, self.mean).float().view(-1, 1, 1, 1) * 255
        shape = (count, channels if self.per_channel else 1, height, width)
        noise = torch.randn(shape, generator=generator) * sigma + mean
        return (images + noise).clamp(0, 255)


def _is_default_border(transform: BasicTransform) -> bool:
    """Linear interpolation and a black constant border: what ``grid_sample`` reproduces."""
    return (
        getattr(transform, "interpolation", cv2.INTER_LINEAR) == cv2.INTER_LINEAR
        and transform.border_mode == cv2.BORDER_CONSTANT
        and float(np.max(transform.fill)) == 0.0
    )


def _pads(padding: int | Sequence[int]) -> tuple[int, int, int, int] | None:
    """``A.Pad``'s ``padding`` as (left, top, right, bottom)."""
    if isinstance(padding, int | float):
        return (int(padding),) * 4
    values = [int(v) for v in padding]
    if len(values) == 2:
        return values[0], values[1], values[0], values[1]
    return (values[0], values[1], values[2], values[3]) if len(values) == 4 else None


def _pad_crop(transform: Transform) -> _BatchedOp | None:
    children = getattr(transform, "transforms", [])
    if len(children) != 2 or not isinstance(transform, A.Sequential):
        return None
    pad, crop = children
    if not (isinstance(pad, A.Pad) and isinstance(crop, A.RandomCrop)) or crop.pad_if_needed:
        return None
    pads = _pads(pad.padding)
    if pads is None or pad.p != 1 or crop.p != 1 or not _is_default_border(pad):
        return None
    return _PadCrop(transform.p, pads, (crop.height, crop.width))


def _affine_op(transform: Any) -> _BatchedOp | None:
    sheared = any(v != 0 for pair in transform.shear.values() for v in pair)
    if sheared or transform.fit_output or transform.balanced_scale:
        return None
    return _Affine(transform) if _is_default_border(transform) else None


def _rotate_op(transform: Any) -> _BatchedOp | None:
    if transform.crop_border or not _is_default_border(transform):
        return None
    return _Rotate(transform)


def _resized_crop_op(transform: Any) -> _BatchedOp | None:
    linear = transform.interpolation == cv2.INTER_LINEAR and transform.area_for_downscale is None
    return _ResizedCrop(transform) if linear else None


def _noise_op(transform: Any) -> _BatchedOp | None:
    return _GaussNoise(transform) if transform.noise_scale_factor == 1 else None


# Exact types: a subclass may draw or apply differently.
_BATCHED: dict[type, Callable[[Any], _BatchedOp | None]] = {
    A.Sequential: _pad_crop,
    A.RandomResizedCrop: _resized_crop_op,
    A.Affine: _affine_op,
    A.Rotate: _rotate_op,
    A.HorizontalFlip: lambda t: _Flip(t.p, dim=-1),
    A.VerticalFlip: lambda t: _Flip(t.p, dim=-2),
    A.ColorJitter: _ColorJitter,
    A.GaussNoise: _noise_op,
}


class TensorAugmentation:
    """An albumentations pipeline run as batched tensor ops, one random stream per instance.

    Each transform of the pipeline becomes one masked op over the whole batch: the images that
    fire (each with the transform's ``p``) get their own parameters, drawn from the same
    distributions albumentations draws them from (integer shifts truncated, independent x/y
    zoom, 10 crop tries, a random colour-op order, ...). Each geometric transform is one bilinear
    ``grid_sample``, resampling like ``cv2.warpAffine`` / ``cv2.resize``. Pixels stay float
    between transforms (albumentations rounds to uint8 after each), so outputs match in
    distribution, not byte for byte. Build one with :func:`tensor_augmentation`.

    Attributes:
        ops: The batched transforms, in pipeline order.
        generator: The random stream; :meth:`reseed` restarts it.
    """

    def __init__(self, ops: Sequence[_BatchedOp], seed: int) -> None:
        self.ops = list(ops)
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed``."""
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augment uint8 ``(N, H, W, C)`` images into float32 ``(N, C, H, W)`` in ``[0, 255]``.

        Runs on one intra-op thread: the ops on a batch are too small to gain from more, and
        with other work on the cores every parallel region waits for a busy core (a 64-image
        MNIST batch took 0.8 ms on one thread, 1-35 ms on two under load).
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            batch = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()
            for op in self.ops:
                batch = op(batch, self.generator)
            return batch
        finally:
            torch.set_num_threads(threads)


def tensor_augmentation(transform: BaseCompose, seed: int) -> TensorAugmentation | None:
    """The batched equivalent of ``transform``, or None if it has a step the tensor path lacks.

    Every pipeline :func:`build_augmentation` makes is covered; a hand-edited ``pipeline.json``
    with another transform or option (shear, a non-black border, cubic interpolation, ...)
    gives None and runs per image through albumentations instead.

    Args:
        transform: An ``A.Compose`` (applied with probability 1).
        seed: Seeds the tensor path's random stream.
    """
    if type(transform) is not A.Compose or transform.p != 1:
        return None
    ops = []
    for child in transform.transforms:
        build = _BATCHED.get(type(child))
        op = build(child) if build is not None else None
        if op is None:
            return None
        ops.append(op)
    return TensorAugmentation(ops, seed)


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
    return _normalize_pixels(images.permute(0, 3, 1, 2).to(torch.float32), mean, std)


def _normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """float32 ``(N, C, H, W)`` pixel values in ``[0, 255]`` to ``(x / 255 - mean) / std``."""
    shape = (1, pixels.shape[1], 1, 1)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=pixels.device).view(shape)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=pixels.device).view(shape)
    return ((pixels / 255.0 - mean_t) / std_t).contiguous()


class BatchTransform:
    """What the model sees: optional augmentation, then :func:`normalize_batch`.

    Call it on a uint8 ``(N, H, W, C)`` batch (tensor or array) to get float32
    ``(N, C, H, W)``. Augmentation runs as batched tensor ops (:class:`TensorAugmentation`)
    when the pipeline allows it, else per image through albumentations on CPU numpy; with no
    augmentation the input tensor's device is kept. Inside a DataLoader worker the random
    stream is reseeded from the worker's seed the first time it runs there: otherwise every
    worker (and, with non-persistent workers, every epoch) would replay the same copy of it.

    Args:
        augmentation: The albumentations pipeline, or None for evaluation.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
        seed: Seeds the batched path's stream; also mixed into worker reseeding.
        batched: Use the batched tensor path when the pipeline allows it; False forces the
            per-image albumentations path (benchmarks compare the two).

    Attributes:
        augmentation: The albumentations pipeline, or None.
        batched: Its :class:`TensorAugmentation`, or None (per-image path or no augmentation).
    """

    def __init__(
        self,
        augmentation: BaseCompose | None,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        *,
        batched: bool = True,
    ) -> None:
        self.augmentation = augmentation
        self.batched = (
            tensor_augmentation(augmentation, seed)
            if batched and augmentation is not None
            else None
        )
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
        if self.batched is not None:
            array = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
            _check_images(np.asarray(array))
            self._reseed_in_new_worker()
            pixels = self.batched(torch.from_numpy(np.ascontiguousarray(array)))
            return _normalize_pixels(pixels, self.mean, self.std)
        if self.augmentation is not None:
            array = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
            images = torch.from_numpy(self._augment(self.augmentation, np.asarray(array)))
        elif isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        return normalize_batch(images, self.mean, self.std)

    def _augment(self, augmentation: BaseCompose, batch: np.ndarray) -> np.ndarray:
        _check_images(batch)
        self._reseed_in_new_worker()
        out = np.empty_like(batch)
        for index, image in enumerate(batch):
            out[index] = augment_image(augmentation, image)
        return out

    def _reseed_in_new_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        self._worker_seed = info.seed
        # torch derives info.seed from the (seeded) main RNG per worker and per epoch.
        mixed = int(np.random.SeedSequence([self.seed, info.seed]).generate_state(1)[0])
        if self.batched is not None:
            self.batched.reseed(mixed)
        elif self.augmentation is not None:
            seed_augmentation(self.augmentation, mixed)


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

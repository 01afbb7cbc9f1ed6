"""The augmentation pipeline as an object: built from ``params.yaml``, seeded, saved, loaded.

:func:`build_augmentation` turns the ``augment:`` section into an albumentations 2.0.x
``A.Compose`` that maps a uint8 ``(H, W, C)`` image to ``(H, W, C)``; the augment stage saves it
(:func:`save_augmentation`) and training loads it back (:func:`load_augmentation`), so online
augmentation runs exactly the pipeline the stage wrote.

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

import os
import random
import re
from collections.abc import Callable
from typing import Any, TypeAlias

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform

from convpipe.config.schema import (
    AffineParams,
    AugmentParams,
    ColorJitterParams,
    CropParams,
    ErasingParams,
    NoiseParams,
    ResizedCropParams,
    RotateParams,
    Toggle,
)
from convpipe.data.transforms.trivial import TrivialAugmentWide
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path

#: One step of a pipeline: a single transform or a composition of them.
Transform: TypeAlias = BasicTransform | BaseCompose
#: ``(H, W)`` of an image.
ImageHW: TypeAlias = tuple[int, int]

#: The ``augment`` sub-sections, in the order their transforms run: geometry first (so
#: photometric changes are not smeared by interpolation), noise after them (so it is not
#: blurred), erasing last (what it blanks out is not changed again).
SECTIONS: tuple[str, ...] = (
    "crop",
    "resized_crop",
    "affine",
    "rotate",
    "horizontal_flip",
    "vertical_flip",
    "trivial_augment",
    "color_jitter",
    "gaussian_noise",
    "erasing",
)


# --------------------------------------------------------------------------- building


#: ``augment.crop.border`` as OpenCV's border: black, or mirrored with the edge pixel repeated
#: (``dcba|abcd``), which is also what ``grid_sample``'s reflection gives the batched path.
CROP_BORDERS = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT}


def _crop(section: CropParams, hw: ImageHW, channels: int) -> Transform:
    """Pad ``padding`` pixels (``augment.crop.border``) on every side, then crop back to ``hw``.

    ``A.Pad(padding)`` gives exactly the ``(H + 2p, W + 2p)`` canvas that
    ``A.PadIfNeeded(H + 2p, W + 2p)`` would for same-size images (verified byte-identical), but
    PadIfNeeded in albumentations 2.0.8 serialises a stray ``padding`` key and warns on load.
    """
    height, width = hw
    return A.Sequential(
        [
            A.Pad(padding=section.padding, border_mode=CROP_BORDERS[section.border], fill=0),
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


def _trivial_augment(section: Toggle, hw: ImageHW, channels: int) -> Transform:
    return TrivialAugmentWide(p=section.p)


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


#: ``augment.erasing.fill`` as albumentations' ``fill``: black pixels or a random value each.
ERASING_FILLS: dict[str, float | str] = {"black": 0, "random": "random"}


def _erasing(section: ErasingParams, hw: ImageHW, channels: int) -> Transform:
    """``A.Erasing``: one rectangle of ``scale`` of the area and aspect ``ratio`` (w / h)."""
    return A.Erasing(
        scale=tuple(section.scale),
        ratio=tuple(section.ratio),
        fill=ERASING_FILLS[section.fill],
        p=section.p,
    )


_BUILDERS: dict[str, Callable[[Any, ImageHW, int], Transform]] = {
    "crop": _crop,
    "resized_crop": _resized_crop,
    "affine": _affine,
    "rotate": _rotate,
    "horizontal_flip": _horizontal_flip,
    "vertical_flip": _vertical_flip,
    "trivial_augment": _trivial_augment,
    "color_jitter": _color_jitter,
    "gaussian_noise": _gaussian_noise,
    "erasing": _erasing,
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

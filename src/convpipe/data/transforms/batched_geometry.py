"""The geometric transforms as batched ops: one bilinear ``grid_sample`` per transform and batch.

Each op draws per-image parameters from the distributions albumentations draws them from and
turns them into ``(n, 3, 3)`` pixel-space affine maps, resampled like ``cv2.warpAffine`` /
``cv2.resize`` with a linear interpolation. Only the options that resampling reproduces are
covered (:data:`GEOMETRY_OPS`); anything else is left to albumentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import BasicTransform

from convpipe.data.transforms.batched_ops import BatchedOp, OpBuilder, uniform, warp
from convpipe.data.transforms.factory import ImageHW, Transform
from convpipe.errors import ConvpipeError

#: ``padding_mode`` of ``grid_sample`` for an albumentations border: black, edge pixels, or
#: mirrored about the edge (``cv2.BORDER_REFLECT`` for whole-pixel shifts).
_ZEROS, _BORDER, _REFLECT = "zeros", "border", "reflection"


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
    """Refuse a crop built for other images.

    The per-image path (:func:`~convpipe.data.transforms.apply.augment_image`) refuses them too.
    """
    if tuple(int(v) for v in size) != tuple(hw):
        raise ConvpipeError(
            f"{name} makes {tuple(size)} images but the data is {tuple(hw)}",
            "",
            "rebuild the pipeline for this data (dvc repro augment)",
        )


class _Geometric(BatchedOp):
    """A transform that is one affine resampling per image."""

    padding = _ZEROS

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hw = (images.shape[2], images.shape[3])
        return warp(images, self.matrices(images.shape[0], hw, generator), self.padding)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        """float64 ``(count, 3, 3)`` source-to-destination maps."""
        raise NotImplementedError


class _PadCrop(_Geometric):
    """``A.Pad`` then ``A.RandomCrop`` back to the size: a random whole-pixel shift."""

    def __init__(
        self, p: float, pads: tuple[int, int, int, int], size: tuple[int, int], padding: str
    ) -> None:
        super().__init__(p)
        self.left, self.top, self.right, self.bottom = pads
        self.size = size
        self.padding = padding

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        _check_size("augment.crop", self.size, hw)
        # RandomCrop: offset = int((padded - size + 1) * U[0, 1)), uniform over the positions
        dy = torch.floor(uniform(generator, count, (0, 1)) * (self.top + self.bottom + 1))
        dx = torch.floor(uniform(generator, count, (0, 1)) * (self.left + self.right + 1))
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
        area = uniform(generator, count, [s * height * width for s in self.scale], (10,))
        logs = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(uniform(generator, count, logs, (10,)))
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
        top = torch.floor((height - crop_h + 1) * uniform(generator, count, (0, 1)))
        left = torch.floor((width - crop_w + 1) * uniform(generator, count, (0, 1)))
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
            return torch.floor(uniform(generator, count, (low, high + 1)))
        # int(uniform(...) * size): truncated towards zero
        return torch.trunc(uniform(generator, count, self.percent[axis]) * size)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        height, width = hw
        shift = (
            self._shift("x", count, width, generator),
            self._shift("y", count, height, generator),
        )
        zoom_x = uniform(generator, count, self.scale["x"])
        zoom_y = zoom_x if self.keep_ratio else uniform(generator, count, self.scale["y"])
        degrees = uniform(generator, count, self.rotate)
        return _affine_matrices(hw, shift, (zoom_x, zoom_y), degrees)


class _Rotate(_Geometric):
    """``A.Rotate`` (``crop_border=False``): a rotation about the centre, black corners."""

    def __init__(self, transform: A.Rotate) -> None:
        super().__init__(transform.p)
        self.limit = tuple(float(v) for v in transform.limit)

    def matrices(self, count: int, hw: ImageHW, generator: torch.Generator) -> torch.Tensor:
        zeros, ones = (torch.full((count,), v, dtype=torch.float64) for v in (0.0, 1.0))
        degrees = uniform(generator, count, self.limit)
        return _affine_matrices(hw, (zeros, zeros), (ones, ones), degrees)


class _Flip(BatchedOp):
    """``A.HorizontalFlip`` (``dim=-1``) or ``A.VerticalFlip`` (``dim=-2``)."""

    def __init__(self, p: float, dim: int) -> None:
        super().__init__(p)
        self.dim = dim

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images.flip(self.dim)


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


def _pad_crop(transform: Transform) -> BatchedOp | None:
    children = getattr(transform, "transforms", [])
    if len(children) != 2 or not isinstance(transform, A.Sequential):
        return None
    pad, crop = children
    if not (isinstance(pad, A.Pad) and isinstance(crop, A.RandomCrop)) or crop.pad_if_needed:
        return None
    pads = _pads(pad.padding)
    if pads is None or pad.p != 1 or crop.p != 1:
        return None
    if _is_default_border(pad):
        return _PadCrop(transform.p, pads, (crop.height, crop.width), _ZEROS)
    if pad.border_mode == cv2.BORDER_REFLECT and max(pads) < min(crop.height, crop.width):
        return _PadCrop(transform.p, pads, (crop.height, crop.width), _REFLECT)
    return None


def _affine_op(transform: Any) -> BatchedOp | None:
    sheared = any(v != 0 for pair in transform.shear.values() for v in pair)
    if sheared or transform.fit_output or transform.balanced_scale:
        return None
    return _Affine(transform) if _is_default_border(transform) else None


def _rotate_op(transform: Any) -> BatchedOp | None:
    if transform.crop_border or not _is_default_border(transform):
        return None
    return _Rotate(transform)


def _resized_crop_op(transform: Any) -> BatchedOp | None:
    linear = transform.interpolation == cv2.INTER_LINEAR and transform.area_for_downscale is None
    return _ResizedCrop(transform) if linear else None


#: The geometric transforms the batched path covers, by exact type (a subclass may draw or
#: apply differently).
GEOMETRY_OPS: dict[type, OpBuilder] = {
    A.Sequential: _pad_crop,
    A.RandomResizedCrop: _resized_crop_op,
    A.Affine: _affine_op,
    A.Rotate: _rotate_op,
    A.HorizontalFlip: lambda t: _Flip(t.p, dim=-1),
    A.VerticalFlip: lambda t: _Flip(t.p, dim=-2),
}

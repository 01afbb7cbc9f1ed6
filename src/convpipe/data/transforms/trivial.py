"""TrivialAugment Wide (Müller & Hutter 2021): one random op of random strength per image.

Each image gets one of 14 ops, uniformly, at one of 31 strengths, uniformly (and a random sign
where the op has one), with torchvision's ``TrivialAugmentWide`` ranges::

    identity, auto-contrast, equalize
    shear x / y         0 .. 0.99 (signed)        brightness, colour, contrast, sharpness:
    translate x / y     0 .. 32 px (signed)           factor 1 ± 0 .. 0.99
    rotate              0 .. 135 degrees (signed)  posterize   8 .. 2 bits
                                                   solarize    threshold 255 .. 0

The ops are written once, on float ``(n, C, H, W)`` batches in ``[0, 255]``:
:class:`TrivialAugmentWide` is the albumentations transform (offline copies, per image; its
draws come from the pipeline's seeded stream, and it saves and loads with the pipeline), and
:func:`batched_trivial` its batched op for online augmentation, drawing from the same
distribution. Geometric ops fill with black, as torchvision's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from albumentations.core.transforms_interface import ImageOnlyTransform

from convpipe.data.transforms.batched_ops import BatchedOp, warp
from convpipe.data.transforms.batched_photometric import brightness, contrast, saturation

__all__ = ["OPS", "TrivialAugmentWide", "apply_op", "batched_trivial"]

BINS = 31
_Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _affine(images: torch.Tensor, rows: list[list[torch.Tensor | float]]) -> torch.Tensor:
    """Warp by per-image 2x3 pixel maps given row by row (entries: numbers or ``(n,)``)."""
    count = images.shape[0]
    forward = torch.zeros((count, 3, 3), dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            forward[:, i, j] = value if isinstance(value, float) else value.to(torch.float64)
    forward[:, 2, 2] = 1.0
    return warp(images, forward, "zeros")


def _shear_x(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    centre = images.shape[2] / 2 - 0.5
    return _affine(images, [[1.0, m, -m * centre], [0.0, 1.0, 0.0]])


def _shear_y(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    centre = images.shape[3] / 2 - 0.5
    return _affine(images, [[1.0, 0.0, 0.0], [m, 1.0, -m * centre]])


def _translate_x(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(images, [[1.0, 0.0, m], [0.0, 1.0, 0.0]])


def _translate_y(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(images, [[1.0, 0.0, 0.0], [0.0, 1.0, m]])


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise about the centre for positive degrees."""
    cy, cx = images.shape[2] / 2 - 0.5, images.shape[3] / 2 - 0.5
    angle = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _affine(
        images, [[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy]]
    )


def _sharpness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (border pixels kept), factor ``1 + m``."""
    channels = images.shape[1]
    kernel = torch.ones((3, 3), dtype=images.dtype, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(channels, 1, 3, 3)
    smooth = images.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(images, kernel, groups=channels)
    factor = (1.0 + m).view(-1, 1, 1, 1).to(images)
    return smooth + factor * (images - smooth)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1).to(images)
    return torch.floor(images.round() / step) * step


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    level = threshold.view(-1, 1, 1, 1).to(images)
    return torch.where(images >= level, 255.0 - images, images)


def _autocontrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Stretch each channel from its own min..max to 0..255 (flat channels kept)."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    span = high - low
    stretched = (images - low) * (255.0 / torch.where(span > 0, span, torch.ones_like(span)))
    return torch.where(span > 0, stretched, images)


def _equalize(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel, as PIL's (and torchvision's) ``equalize``."""
    out = images.round().clamp(0, 255)
    for image in out:
        for channel in image:
            values = channel.long()
            hist = torch.bincount(values.flatten(), minlength=256)
            last = hist[hist > 0][-1]
            step = torch.div(hist.sum() - last, 255, rounding_mode="floor")
            if int(step) == 0:
                continue
            lut = torch.div(torch.cumsum(hist, 0) + step // 2, step, rounding_mode="floor")
            lut = torch.cat([lut.new_zeros(1), lut[:-1]]).clamp(0, 255)
            channel.copy_(lut[values].to(channel))
    return out


def _identity(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return images


def _enhance(blend: _Op) -> _Op:
    return lambda images, m: blend(images, (1.0 + m).to(images))


#: name -> (op, strength of bin b in 0..30, signed)
OPS: dict[str, tuple[_Op, Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "identity": (_identity, lambda b: b * 0.0, False),
    "shear_x": (_shear_x, lambda b: b * (0.99 / (BINS - 1)), True),
    "shear_y": (_shear_y, lambda b: b * (0.99 / (BINS - 1)), True),
    "translate_x": (_translate_x, lambda b: b * (32.0 / (BINS - 1)), True),
    "translate_y": (_translate_y, lambda b: b * (32.0 / (BINS - 1)), True),
    "rotate": (_rotate, lambda b: b * (135.0 / (BINS - 1)), True),
    "brightness": (_enhance(brightness), lambda b: b * (0.99 / (BINS - 1)), True),
    "color": (_enhance(saturation), lambda b: b * (0.99 / (BINS - 1)), True),
    "contrast": (_enhance(contrast), lambda b: b * (0.99 / (BINS - 1)), True),
    "sharpness": (_sharpness, lambda b: b * (0.99 / (BINS - 1)), True),
    "posterize": (_posterize, lambda b: 8.0 - (b / ((BINS - 1) / 6)).round(), False),
    "solarize": (_solarize, lambda b: 255.0 - b * (255.0 / (BINS - 1)), False),
    "autocontrast": (_autocontrast, lambda b: b * 0.0, False),
    "equalize": (_equalize, lambda b: b * 0.0, False),
}
_NAMES = list(OPS)


def apply_op(
    images: torch.Tensor, op: torch.Tensor, strength_bin: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """Apply op ``op[i]`` at bin ``strength_bin[i]`` (negated where ``negative``) to image i.

    Args:
        images: float ``(n, C, H, W)`` in ``[0, 255]``.
        op: int64 ``(n,)`` indices into :data:`OPS`.
        strength_bin: int64 ``(n,)`` in ``0 .. BINS - 1``.
        negative: bool ``(n,)``: the sign of signed ops.

    Returns:
        float ``(n, C, H, W)`` in ``[0, 255]``.
    """
    out = images.clone()
    for index in op.unique().tolist():
        chosen = (op == index).nonzero().flatten()
        function, strength, signed = OPS[_NAMES[index]]
        m = strength(strength_bin[chosen].to(torch.float64))
        if signed:
            m = torch.where(negative[chosen], -m, m)
        picked = chosen.to(images.device)
        out[picked] = function(images[picked], m.to(images.device)).clamp(0, 255)
    return out


def _draw(count: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    op = torch.randint(len(OPS), (count,), generator=generator)
    strength_bin = torch.randint(BINS, (count,), generator=generator)
    negative = torch.rand(count, generator=generator) < 0.5
    return op, strength_bin, negative


class TrivialAugmentWide(ImageOnlyTransform):
    """The albumentations transform: one image at a time, drawn from the pipeline's stream.

    Args:
        p: Probability that an image gets an op at all (torchvision: always, 1).
    """

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def get_params(self) -> dict[str, Any]:
        """The op, the strength bin and the sign, from the pipeline's seeded stream."""
        return {
            "op": self.py_random.randrange(len(OPS)),
            "strength_bin": self.py_random.randrange(BINS),
            "negative": self.py_random.random() < 0.5,
        }

    def apply(
        self, img: np.ndarray, op: int = 0, strength_bin: int = 0, negative: bool = False, **_: Any
    ) -> np.ndarray:
        """uint8 ``(H, W, C)`` in, uint8 ``(H, W, C)`` out."""
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(torch.float32)
        out = apply_op(
            x, torch.tensor([op]), torch.tensor([strength_bin]), torch.tensor([negative])
        )
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Only ``p``: the ranges are TrivialAugment Wide's own."""
        return ()


class _Batched(BatchedOp):
    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return apply_op(images, *_draw(images.shape[0], generator))


def batched_trivial(transform: Any) -> BatchedOp | None:
    """The batched op of a :class:`TrivialAugmentWide` (for the batched path's table)."""
    return _Batched(transform.p)

"""The photometric transforms as batched ops: colour jitter and Gaussian noise, per pixel.

They run after the geometric ops (see :data:`~convpipe.data.transforms.factory.SECTIONS`) and,
like albumentations' uint8 ops, saturate to ``[0, 255]``. Only the options reproduced here are
covered (:data:`PHOTOMETRIC_OPS`); anything else is left to albumentations.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import torch

from convpipe.data.transforms.batched_ops import BatchedOp, OpBuilder, uniform

#: ITU-R 601 luma, what ``cv2.COLOR_RGB2GRAY`` computes for albumentations' colour transforms.
_LUMA = (0.299, 0.587, 0.114)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """``(n, 1, H, W)`` gray version of ``(n, C, H, W)`` images (themselves when C = 1)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale every pixel by the image's ``factor`` (``(n,)``)."""
    return images * factor.view(-1, 1, 1, 1)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards each image's mean gray level (torchvision semantics)."""
    mean = _luma(images).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    factor = factor.view(-1, 1, 1, 1)
    return images * factor + mean * (1 - factor)


def saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
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


class _ColorJitter(BatchedOp):
    """``A.ColorJitter``: brightness, contrast, saturation, hue, in a random order per image."""

    def __init__(self, transform: A.ColorJitter) -> None:
        super().__init__(transform.p)
        self.ranges = [
            tuple(float(v) for v in getattr(transform, name))
            for name in ("brightness", "contrast", "saturation", "hue")
        ]
        self.ops = (brightness, contrast, saturation, _hue)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = images.shape[0]
        device = images.device
        factors = [uniform(generator, count, b).float().to(device) for b in self.ranges]
        order = torch.rand((count, 4), generator=generator).argsort(dim=1).to(device)
        for position in range(4):
            for index, op in enumerate(self.ops):
                chosen = (order[:, position] == index).nonzero().flatten()
                if chosen.numel():
                    changed = op(images[chosen], factors[index][chosen])
                    # albumentations' uint8 ops saturate after every step
                    images[chosen] = changed.clamp(0, 255)
        return images


class _GaussNoise(BatchedOp):
    """``A.GaussNoise``: per-pixel normal noise, its std (and mean) drawn per image."""

    def __init__(self, transform: A.GaussNoise) -> None:
        super().__init__(transform.p)
        self.std = tuple(float(v) for v in transform.std_range)
        self.mean = tuple(float(v) for v in transform.mean_range)
        self.per_channel = bool(transform.per_channel)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, channels, height, width = images.shape
        sigma = uniform(generator, count, self.std).float().view(-1, 1, 1, 1) * 255
        mean = uniform(generator, count, self.mean).float().view(-1, 1, 1, 1) * 255
        shape = (count, channels if self.per_channel else 1, height, width)
        noise = torch.randn(shape, generator=generator) * sigma + mean
        return (images + noise.to(images.device)).clamp(0, 255)


class _Erasing(BatchedOp):
    """``A.Erasing``: one rectangle per image, drawn as albumentations 2.0.8 draws it.

    The area is uniform in ``scale`` times the image's, capped so that a rectangle of some
    ratio in ``ratio`` fits; the ratio (w / h) is uniform in what fits for that area; the
    corner is uniform over the places it fits. Filled with black or a random value per pixel.
    """

    def __init__(self, transform: A.Erasing, random_fill: bool) -> None:
        super().__init__(transform.p)
        self.scale = tuple(float(v) for v in transform.scale)
        self.ratio = tuple(float(v) for v in transform.ratio)
        self.random_fill = random_fill

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = images.shape
        (r_low, r_high), total = self.ratio, height * width
        cap = min(total * self.scale[1], r_low * height**2, width**2 / r_high)
        if cap < total * self.scale[0]:
            return images  # no rectangle of these shapes fits
        area = uniform(generator, count, (total * self.scale[0], cap))
        low = torch.clamp(area / height**2, min=r_low)
        high = torch.clamp(width**2 / area, max=r_high)
        ratio = low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)
        box_h = torch.sqrt(area / ratio).round().clamp(1, height)
        box_w = torch.sqrt(area * ratio).round().clamp(1, width)
        top = (
            torch.rand(count, generator=generator, dtype=torch.float64) * (height - box_h + 1)
        ).floor()
        left = (
            torch.rand(count, generator=generator, dtype=torch.float64) * (width - box_w + 1)
        ).floor()
        rows = torch.arange(height, dtype=torch.float64).view(1, height, 1)
        cols = torch.arange(width, dtype=torch.float64).view(1, 1, width)
        inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
        inside = inside & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1))
        inside = inside[:, None].to(images.device)
        if self.random_fill:
            fill = torch.randint(0, 256, images.shape, generator=generator).to(images)
        else:
            fill = torch.zeros((), dtype=images.dtype, device=images.device)
        return torch.where(inside, fill, images)


def _erasing_op(transform: Any) -> BatchedOp | None:
    if isinstance(transform.fill, str):
        return _Erasing(transform, True) if transform.fill == "random" else None
    return _Erasing(transform, False) if float(transform.fill) == 0 else None


def _noise_op(transform: Any) -> BatchedOp | None:
    return _GaussNoise(transform) if transform.noise_scale_factor == 1 else None


#: The photometric transforms the batched path covers, by exact type (a subclass may draw or
#: apply differently).
PHOTOMETRIC_OPS: dict[type, OpBuilder] = {
    A.ColorJitter: _ColorJitter,
    A.GaussNoise: _noise_op,
    A.Erasing: _erasing_op,
}

"""What every batched op shares: the per-image firing mask and uniform parameter draws.

A batched op is one albumentations transform re-implemented on a float ``(N, C, H, W)`` batch
in ``[0, 255]``; :mod:`.batched_geometry` and :mod:`.batched_photometric` hold the ops, and
:mod:`.batched` chains them into a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F


def uniform(
    generator: torch.Generator,
    count: int,
    bounds: Sequence[float],
    shape: tuple[int, ...] = (),
) -> torch.Tensor:
    """float64 ``(count, *shape)`` uniform in ``[low, high)``, like ``random.uniform``.

    Args:
        generator: The random stream to draw from (a CPU generator: draws are on the CPU).
        count: One draw (of ``shape``) per image.
        bounds: ``(low, high)``.
        shape: Extra trailing dimensions, e.g. ``(10,)`` for ten tries per image.
    """
    low, high = (float(v) for v in bounds)
    draw = torch.rand((count, *shape), generator=generator, dtype=torch.float64)
    return low + (high - low) * draw


class BatchedOp:
    """One albumentations transform as a batched op on float ``(N, C, H, W)`` in ``[0, 255]``.

    Every image fires independently with probability ``p``; only the images that fire are
    touched, each with its own random parameters.
    """

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Transform the images of float ``(N, C, H, W)`` that fire, in place; return them.

        ``images`` may live on any device; ``generator`` is a CPU stream, so an image gets the
        same parameters wherever the batch is (draws are moved to the images' device).
        """
        fires = torch.rand(images.shape[0], generator=generator) < self.p
        chosen = fires.nonzero().flatten().to(images.device)
        if chosen.numel():
            images[chosen] = self.apply(images[chosen], generator)
        return images

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Transform every image of ``images`` (float ``(n, C, H, W)``)."""
        raise NotImplementedError


#: Turns one albumentations transform into its batched op, or None if an option it uses has no
#: batched equivalent (the pipeline then runs per image through albumentations).
OpBuilder: TypeAlias = Callable[[Any], BatchedOp | None]


def warp(images: torch.Tensor, forward: torch.Tensor, padding: str) -> torch.Tensor:
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
    # the maps are drawn and inverted on the CPU in float64; only the grid goes to the device
    theta = theta[:, :2].to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [count, channels, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)

"""Mixup and CutMix on a training batch: mixed images, both labels, and how much of each.

Mixup (Zhang et al. 2018) trains on ``lam * x_i + (1 - lam) * x_j``; CutMix (Yun et al. 2019)
pastes a box of ``x_j`` covering ``1 - lam`` of ``x_i``. The partner ``j`` of image ``i`` is
the batch reversed (as timm does: no second batch is read), and ``lam ~ Beta(alpha, alpha)``
once per batch. Cross-entropy and binary cross-entropy are linear in the target, so the loss
of the mixed target is exactly ``lam * J(y_i) + (1 - lam) * J(y_j)``:
:meth:`convpipe.models.module.CNNClassifier.data_loss` is taken twice.

The draws use torch's global CPU generator, which ``seed_everything`` seeds and an interrupted
training's resume restores, so a seeded run mixes the same way each time, on any device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Mixed", "mix_batch"]


class Mixed(NamedTuple):
    """A mixed batch.

    Attributes:
        x: The mixed images ``(N, C, H, W)``.
        y_a: Each image's own label ``(N,)``.
        y_b: Its partner's label ``(N,)``.
        lam: The share of ``y_a`` in the target (the box's complement for CutMix).
    """

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    lam: float


def _box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of about ``(1 - lam)`` of the image, centred anywhere, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, ()))
    cx = int(torch.randint(width, ()))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    return top, bottom, left, right


def mix_batch(x: Tensor, y: Tensor, mixup_alpha: float, cutmix_alpha: float) -> Mixed:
    """Mix a batch with mixup or CutMix (one of them, each half the time, when both are on).

    Args:
        x: Float images ``(N, C, H, W)``, normalised.
        y: int64 labels ``(N,)``.
        mixup_alpha: ``train.mixup_alpha`` (0: no mixup).
        cutmix_alpha: ``train.cutmix_alpha`` (0: no CutMix).

    Returns:
        The batch as it is (``lam`` 1) when both are 0, else the mixed batch.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return Mixed(x, y, y, 1.0)
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = x.flip(0)
    if cutmix:
        top, bottom, left, right = _box(x.shape[2], x.shape[3], lam)
        x = x.clone()
        x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])
    else:
        x = lam * x + (1.0 - lam) * partner
    return Mixed(x, y, y.flip(0), lam)

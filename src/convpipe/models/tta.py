"""Test-time augmentation: the mean of the model's logits over a few views of each image.

``evaluate.tta`` names the views; evaluate, ``convpipe predict`` and the registered MLflow
model all classify through :func:`tta_logits`, so the served model is the one evaluated:

- ``none``: the image itself (1 forward pass);
- ``flip``: the image and its horizontal mirror (2 passes);
- ``translate``: the image and it shifted by one pixel up-left and down-right with reflected
  borders (3 passes): for data a mirror would change (digits, text);
- ``flip_translate``: those two, each also shifted by one pixel up-left and down-right with
  reflected borders (6 passes), as in airbench's strongest setting.

The cost is the number of passes times a plain prediction; use a flip only where the training
data's classes survive a mirror (photos of objects: yes; digits and text: no).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from convpipe.config.schema import TtaMode

__all__ = ["TTA_MODES", "tta_logits", "tta_views"]

TTA_MODES: tuple[str, ...] = get_args(TtaMode)  # the schema's evaluate.tta values


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` moved by ``(dy, dx)`` pixels (|d| <= 1), the border filled by reflection."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def tta_views(x: Tensor, mode: str) -> list[Tensor]:
    """The views of a batch that ``mode`` averages over.

    Args:
        x: Float ``(N, C, H, W)``.
        mode: One of :data:`TTA_MODES`.

    Returns:
        1, 2, 3 or 6 tensors of the shape of ``x``: the batch; its mirror (the flips); then
        the batch (and, for ``flip_translate``, its mirror) shifted by ``(-1, -1)`` and
        ``(+1, +1)``.

    Raises:
        ValueError: For an unknown mode, or (with shifts) an image smaller than 2x2.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"evaluate.tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    if mode == "none":
        return [x]
    flip = mode in ("flip", "flip_translate")
    views = [x, x.flip(-1)] if flip else [x]
    if mode in ("translate", "flip_translate"):
        if min(x.shape[-2:]) < 2:
            raise ValueError(f"{mode} needs images of at least 2x2, got {tuple(x.shape[-2:])}")
        for dy, dx in ((-1, -1), (1, 1)):
            shifted = _shifted(x, dy, dx)
            views += [shifted, shifted.flip(-1)] if flip else [shifted]
    return views


def tta_logits(model: Callable[[Tensor], Tensor], x: Tensor, mode: str) -> Tensor:
    """The mean of ``model``'s logits over :func:`tta_views` of ``x``.

    Args:
        model: Maps float ``(N, C, H, W)`` to logits ``(N,)`` or ``(N, K)``.
        x: Float ``(N, C, H, W)``, normalised as in training.
        mode: One of :data:`TTA_MODES`.

    Returns:
        Logits of the same shape as ``model(x)``; for ``none``, exactly ``model(x)``.
    """
    views = tta_views(x, mode)
    if len(views) == 1:
        return model(x)
    # one forward pass over every view: larger batches run faster than several small ones
    logits = model(torch.cat(views))
    return logits.reshape(len(views), x.shape[0], *logits.shape[1:]).mean(dim=0)

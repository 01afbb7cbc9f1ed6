"""Exported logits against the checkpoint's: the check an export must pass to be written."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from convpipe.data.datamodule import EVAL_BATCH_SIZE
from convpipe.data.datasets import ArrayDataset
from convpipe.tools.export.network import Runner

__all__ = ["TOLERANCE", "Parity", "parity", "run_batches"]

#: Largest absolute difference allowed between exported and checkpoint logits.
TOLERANCE = 1e-5


class Parity(NamedTuple):
    """How far exported logits are from the checkpoint's.

    Attributes:
        images: Images compared.
        max_abs_diff: ``max |exported - reference|`` over every logit (0 for no images).
        max_abs_logit: ``max |reference|``: float32 spacing grows with it, so it tells how
            much of the difference rounding alone explains.
    """

    images: int
    max_abs_diff: float
    max_abs_logit: float

    @property
    def ok(self) -> bool:
        """Whether the difference is within :data:`TOLERANCE`."""
        return self.max_abs_diff <= TOLERANCE


def parity(reference: Tensor, exported: Tensor) -> Parity:
    """Compare exported logits with the checkpoint's.

    Args:
        reference: The checkpoint's logits, ``(N,)`` or ``(N, K)``.
        exported: The exported model's logits for the same images, same shape.

    Returns:
        The :class:`Parity` of the two; a NaN anywhere counts as an infinite difference.

    Raises:
        ValueError: If the shapes differ.
    """
    if tuple(reference.shape) != tuple(exported.shape):
        raise ValueError(
            f"exported logits have shape {tuple(exported.shape)}, "
            f"the checkpoint's {tuple(reference.shape)}"
        )
    if reference.numel() == 0:
        return Parity(int(reference.shape[0]), 0.0, 0.0)
    ref, out = reference.double(), exported.double()
    diff = (out - ref).abs().nan_to_num(nan=float("inf"))
    return Parity(int(reference.shape[0]), float(diff.max()), float(ref.abs().max()))


def run_batches(run: Runner, dataset: ArrayDataset, batch: int = EVAL_BATCH_SIZE) -> Tensor:
    """Logits of ``run`` for every image of ``dataset``, in order, ``batch`` images at a time.

    The batching of :func:`convpipe.inference.predict.predict_logits`: both see the same
    batches.
    """
    outputs = []
    for start in range(0, len(dataset), batch):
        images, _ = dataset.__getitems__(list(range(start, min(start + batch, len(dataset)))))
        outputs.append(run(images))
    return torch.cat(outputs)

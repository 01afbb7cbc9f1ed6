"""Online augmentation: an albumentations pipeline run as batched tensor ops.

On 2 cores the shipped pipeline costs ~100 µs per 28x28 image through albumentations, image by
image (training the default CNN ~30 % slower), and ~13 µs as batched tensor ops
(:class:`TensorAugmentation`, chaining the ops of :mod:`.batched_geometry` and
:mod:`.batched_photometric`; benchmarks/bench_augment.py). A pipeline with a transform or an
option the tensor path does not know gets None from :func:`tensor_augmentation` and falls back
to albumentations, per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import torch
from albumentations.core.composition import BaseCompose

from convpipe.data.transforms.batched_geometry import GEOMETRY_OPS
from convpipe.data.transforms.batched_ops import BatchedOp, OpBuilder
from convpipe.data.transforms.batched_photometric import PHOTOMETRIC_OPS
from convpipe.data.transforms.trivial import TrivialAugmentWide, batched_trivial

_BATCHED: dict[type, OpBuilder] = {
    **GEOMETRY_OPS,
    **PHOTOMETRIC_OPS,
    TrivialAugmentWide: batched_trivial,
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

    def __init__(self, ops: Sequence[BatchedOp], seed: int) -> None:
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

    Every pipeline :func:`~convpipe.data.transforms.factory.build_augmentation` makes is
    covered; a hand-edited ``pipeline.json`` with another transform or option (shear, a
    non-black border, cubic interpolation, ...) gives None and runs per image through
    albumentations instead.

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

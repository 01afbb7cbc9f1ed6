"""What the model sees: uint8 ``(N, H, W, C)`` batches as normalised float32 ``(N, C, H, W)``.

Training and evaluation both get their batch transform as a :class:`BatchTransform` (from
:meth:`convpipe.data.datamodule.ConvDataModule.transform`) and inference normalises with
:func:`normalize_batch`; all of them compute ``(x / 255 - mean) / std`` with the per-channel
mean and std of the training images, so the sides cannot drift apart. Only training augments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from albumentations.core.composition import BaseCompose

from convpipe.data.transforms.apply import augment_image, check_images
from convpipe.data.transforms.batched import tensor_augmentation
from convpipe.data.transforms.factory import seed_augmentation


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
        """Augment (if training) and normalise a uint8 ``(N, H, W, C)`` batch.

        The result is on the device of ``images`` (CPU for an array): in a DataLoader worker
        that is the CPU, after the batch's copy to the model's device (``on_after_batch_transfer``)
        it is the GPU. Random draws always come from a CPU stream, so both give the same images.
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if self.batched is not None:
            check_images(images)
            self._reseed_in_new_worker()
            return _normalize_pixels(self.batched(images), self.mean, self.std)
        if self.augmentation is not None:
            # albumentations runs on numpy, image by image: to the host and back
            augmented = self._augment(self.augmentation, images.cpu().numpy())
            images = torch.from_numpy(augmented).to(images.device)
        return normalize_batch(images, self.mean, self.std)

    def _augment(self, augmentation: BaseCompose, batch: np.ndarray) -> np.ndarray:
        check_images(batch)
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

"""Datasets that serve whole batches of the prepared uint8 arrays (or their indices).

Batches are fetched whole (``__getitems__``): one fancy-indexing read of the memmap per batch
instead of one Python call per image, then transformed once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from convpipe.data.transforms.normalize import BatchTransform

__all__ = ["ArrayDataset", "Batch", "ConcatBatches", "IndexDataset"]

#: A batch: images (uint8 ``(B, H, W, C)``, float ``(B, C, H, W)`` or indices) and labels
Batch = tuple[torch.Tensor, torch.Tensor]


class ArrayDataset(Dataset[Batch]):
    """Images ``(N, H, W, C)`` uint8 and labels ``(N,)``, served a batch at a time.

    Args:
        x: uint8 images, usually a read-only memmap.
        y: int64 labels.
        transform: maps a uint8 ``(B, H, W, C)`` batch to float ``(B, C, H, W)``; None serves
            the uint8 batch as it is (the transform then runs on the model's device).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: BatchTransform | None) -> None:
        self.x = x
        self.y = np.asarray(y, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> Batch:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        """Fetch and transform a whole batch: float ``(B, C, H, W)``, int64 ``(B,)``."""
        images, labels = self.read(indices)
        return (images if self.transform is None else self.transform(images)), labels

    def read(self, indices: Sequence[int]) -> Batch:
        """Fetch a batch untransformed: uint8 ``(B, H, W, C)``, int64 ``(B,)``."""
        order = np.asarray(indices, dtype=np.int64)
        # memmaps read fastest in ascending order; the original order is restored after
        ascending = np.argsort(order, kind="stable")
        images = np.empty((order.size, *self.x.shape[1:]), dtype=np.uint8)
        images[ascending] = self.x[order[ascending]]
        return torch.from_numpy(images), torch.from_numpy(self.y[order])


class IndexDataset(Dataset[Batch]):
    """The batches of a device-resident dataset: indices into it, and their labels.

    Args:
        y: int64 labels ``(N,)``.
    """

    def __init__(self, y: np.ndarray) -> None:
        self.y = np.asarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> Batch:
        indices, labels = self.__getitems__([index])
        return indices[0], labels[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        """int64 indices ``(B,)`` and labels ``(B,)``, in the sampler's order."""
        order = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(order), torch.from_numpy(self.y[order])


class ConcatBatches(ConcatDataset[Batch]):
    """ConcatDataset that keeps whole-batch fetching across its parts.

    The parts' uint8 rows are gathered into one batch and transformed once, so a batch gets
    the same augmentation draws however its images are split over the parts, and wherever
    the transform runs (in the loader or on the device).

    Args:
        parts: the datasets, without transforms of their own.
        transform: maps the gathered uint8 ``(B, H, W, C)`` batch to float ``(B, C, H, W)``;
            None serves it as uint8.
    """

    def __init__(self, parts: list[ArrayDataset], transform: BatchTransform | None) -> None:
        super().__init__(parts)
        self.transform = transform

    def __getitem__(self, index: int) -> Batch:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        bounds = np.asarray(self.cumulative_sizes)
        idx = np.asarray(indices, dtype=np.int64)
        part = np.searchsorted(bounds, idx, side="right")
        images: torch.Tensor | None = None
        labels = torch.empty(idx.size, dtype=torch.int64)
        for p in np.unique(part):
            rows = torch.from_numpy(np.flatnonzero(part == p))
            offset = int(bounds[p - 1]) if p > 0 else 0
            dataset = cast(ArrayDataset, self.datasets[int(p)])
            x, y = dataset.read((idx[rows.numpy()] - offset).tolist())
            if images is None:
                images = torch.empty((idx.size, *x.shape[1:]), dtype=x.dtype)
            images[rows] = x
            labels[rows] = y
        assert images is not None  # indices is never empty: DataLoader batches have >= 1
        return (images if self.transform is None else self.transform(images)), labels

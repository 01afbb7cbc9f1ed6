"""Which images each process reads, in what order, and a training loader that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from convpipe.data.datasets import Batch

__all__ = ["ResumableSampler", "ShardSampler", "TrainLoader", "collate_batch"]


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous share of ``0..size-1``, without DistributedSampler's padding.

    Over all ranks an evaluation then sees every image exactly once.

    Args:
        size: number of images.
        world: number of processes.
        rank: this process's global rank.
    """

    def __init__(self, size: int, world: int, rank: int) -> None:
        bounds = np.linspace(0, size, world + 1).astype(int)
        self.indices = range(int(bounds[rank]), int(bounds[rank + 1]))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler[int]):
    """DistributedSampler that can start an epoch part-way, where an interrupted one stopped.

    The order is still a function of ``(seed, epoch)`` only; :meth:`resume_at` drops the
    images the interrupted epoch already trained on, once, so the rest of that epoch sees
    exactly the batches it would have seen. ``len()`` stays the full epoch's, as Lightning
    counts the resumed epoch's batches from where it stopped.
    """

    def __init__(self, dataset: Dataset[Batch], world: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Make epoch ``epoch``'s next pass begin at its ``start``-th index."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
            if epoch == self.epoch:
                return iter(indices[start:])
        return iter(indices)


class TrainLoader(DataLoader[Batch]):
    """The training DataLoader, resumable mid-epoch through Lightning's loader state.

    Lightning saves ``state_dict()`` in every checkpoint and hands it back to
    ``load_state_dict`` on resume (a loader without them restarts the epoch from its first
    batch). The position is the number of batches the fit loop *completed*, not the number
    fetched, since workers prefetch ahead of training.

    Args:
        dataset: the training images.
        sampler: its :class:`ResumableSampler`.
        batch_size: images per batch and process.
        completed: returns how many batches of the current epoch were trained on.
        **kwargs: further DataLoader arguments.
    """

    def __init__(
        self,
        dataset: Dataset[Batch],
        sampler: ResumableSampler,
        batch_size: int,
        completed: Callable[[], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._completed = completed

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches were trained on."""
        sampler = cast(ResumableSampler, self.sampler)
        return {"epoch": int(sampler.epoch), "batches": int(self._completed())}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the saved epoch after its last trained batch."""
        sampler = cast(ResumableSampler, self.sampler)
        start = int(state_dict["batches"]) * int(self.batch_size or 1)
        sampler.resume_at(int(state_dict["epoch"]), start)


def collate_batch(batch: Any) -> Any:
    """The dataset already returns a collated ``(x, y)`` batch; pass it through."""
    return batch

"""The training loader of ``data.format: litdata``: LitData's streaming dataset and loader.

LitData's :class:`~litdata.StreamingDataset` shards a split's chunks over DDP ranks, nodes and
DataLoader workers, shuffles them per epoch from the seed and downloads from an object store
on demand; its :class:`~litdata.StreamingDataLoader` saves and restores the position inside
an epoch, which Lightning keeps in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from litdata import CombinedStreamingDataset, StreamingDataLoader

from convpipe.data.streaming import open_split

__all__ = ["StreamCollate", "StreamLoader", "streaming_dataset"]


def streaming_dataset(locations: Sequence[str], seed: int) -> Any:
    """The training images of ``locations`` (prepared, then augmented), shuffled per epoch.

    LitData shuffles the order of the chunks and every image inside a chunk from ``seed`` and
    the epoch, and gives each DDP rank (and each of its DataLoader workers) its own chunks.
    Under DDP it drops the images that would leave the ranks unequal (fewer than one per
    rank and worker), so every rank runs the same number of steps.

    Returns:
        A ``StreamingDataset``, or LitData's ``CombinedStreamingDataset`` over several that
        visits every image of each once per epoch, interleaved at random.
    """
    # item_shuffle_window 0: a full permutation inside each chunk (LitData's default shuffles
    # blocks of 256 images, so the same images would share batches every epoch); batch_decode
    # 0 then decodes the one image asked for (LitData's "auto" decodes the 256 around it, and
    # a random order would decode each block ~256 times: 100x slower, measured). Each dataset
    # its own seed: augmented copies are stored in their originals' order, and one seed would
    # put every image and its copy at the same place of their streams.
    datasets = [
        open_split(where, shuffle=True, seed=seed + k, item_shuffle_window=0, batch_decode=0)
        for k, where in enumerate(locations)
    ]
    if len(datasets) == 1:
        return datasets[0]
    return CombinedStreamingDataset(datasets, seed=seed, iterate_over_all=True)


class StreamCollate:
    """Stack streamed items into a batch: uint8 ``(B, H, W, C)`` and int64 labels ``(B,)``.

    Args:
        transform: applied to the stacked batch (normalise, augment), in the DataLoader
            worker; None leaves the uint8 batch for the model's device.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``items`` (LitData's ``{"image", "label"}`` dicts)."""
        images = torch.from_numpy(np.stack([np.asarray(item["image"]) for item in items]))
        labels = torch.tensor([int(item["label"]) for item in items], dtype=torch.int64)
        return (images if self.transform is None else self.transform(images)), labels


class StreamLoader(StreamingDataLoader):
    """LitData's loader, with the epoch taken from the Trainer rather than counted.

    LitData numbers epochs by counting its own ``iter()`` calls, and Lightning hands a
    checkpoint's loader state back only when it was saved part-way through an epoch. A
    training resumed from the end of epoch k would count from 1 again and replay epoch 1's
    order; with the Trainer's epoch every epoch has its order whatever was interrupted.
    A state restored part-way through an epoch serves the rest of that epoch only.

    Args:
        dataset: a ``StreamingDataset`` or ``CombinedStreamingDataset``.
        epoch: returns the 0-based epoch about to run (None: count, as LitData does).
        **kwargs: ``StreamingDataLoader``'s arguments.
    """

    # set by StreamingDataLoader (unannotated there)
    restore: bool
    current_epoch: int

    def __init__(self, dataset: Any, epoch: Callable[[], int | None], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        """The batches of the next epoch, or the rest of a restored one."""
        epoch = self._epoch()
        if epoch is not None:
            # LitData leaves a restored state in force until its iterator runs dry, which
            # Lightning never makes it do (it stops after len() batches): the state is done
            # with once the Trainer moves past its epoch (LitData's epochs start at 1).
            if self.restore and self.current_epoch != epoch + 1:
                self.restore = False
            if not self.restore:
                self.current_epoch = epoch
        yield from super().__iter__()

"""``data.format: litdata``: prepared splits as LitData's optimized chunks, read or streamed.

A split folder holds LitData chunk files (``chunk-0-<k>.bin``) and their ``index.json``; each
item is ``{"image": uint8 (H, W, C), "label": int}``. The labels are also kept beside the
folder as ``<split>_y.npy`` (8 bytes an image), so class counts, evaluation records and the
manifest never read the images.

Two ways to read a split:

- :class:`StreamedImages`: random access by index, an array-like stand-in for the ``npy``
  memmap (evaluation, augment, whitening, predict on a split);
- :mod:`convpipe.data.stream_loader`: LitData's ``StreamingDataset`` and
  ``StreamingDataLoader`` for training.

Never import torchvision here: LitData lists it, but uint8 arrays need none of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convpipe.errors import ConvpipeError
from convpipe.io import content_hash
from convpipe.redact import mask

INDEX = "index.json"
#: LitData's chunk size: the unit a node downloads, caches and shuffles. 64 MB is LitData's
#: own default for images: few files per split, small enough for many in flight per worker.
CHUNK_BYTES = "64MB"


class ShardWriter:
    """Append images to a LitData split folder, in order, in bounded memory.

    LitData's ``BinaryWriter`` flushes a chunk file whenever :data:`CHUNK_BYTES` are
    buffered, so at most one chunk is held. One writer in one process gives the same chunk
    files whatever the machine (``optimize`` with N workers would split them N ways).

    Args:
        folder: the split folder to create (inside prepare's temporary output).
        chunk_bytes: the most bytes of a chunk file (LitData's size syntax, or a number).
    """

    def __init__(
        self, folder: str | os.PathLike[str], chunk_bytes: int | str = CHUNK_BYTES
    ) -> None:
        from litdata.streaming.writer import BinaryWriter

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = BinaryWriter(str(self.folder), chunk_bytes=chunk_bytes)
        self.count = 0

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append uint8 images ``(B, H, W, C)`` with their int labels ``(B,)``."""
        for image, label in zip(images, labels, strict=True):
            item = {"image": np.ascontiguousarray(image), "label": int(label)}
            self._writer.add_item(self.count, item)
            self.count += 1

    def close(self) -> str:
        """Flush the last chunk and write ``index.json``.

        The index's ``updated_at``, which LitData keys its download cache with (a stale
        cached copy is dropped when it changes), is set to the chunks' SHA-256: deterministic
        (LitData's default, the time of writing, would make every prepare's output differ)
        and new exactly when the data is.

        Returns:
            That ``sha256:<hex>`` of the chunk files, in index order.

        Raises:
            ConvpipeError: nothing was written (LitData has no empty split).
        """
        if self.count == 0:
            raise ConvpipeError(
                "no image of this split could be written",
                f"in {self.folder}",
                "check the skipped files report, or add images",
            )
        self._writer.done()
        # merge() would wait for $WORLD_SIZE writers' indexes (a stage run inside a DDP or
        # SLURM job's environment would hang); this process is the only writer
        self._writer._merge_no_wait()
        path = self.folder / INDEX
        index = json.loads(path.read_text(encoding="utf-8"))
        digest = content_hash(chunk_files(self.folder))
        index["updated_at"] = digest.replace(":", "-")  # a folder name in LitData's cache
        path.write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
        return digest


def chunk_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The chunk files of a local split folder, in the order its index lists them."""
    index = _read_index(folder)
    return [Path(folder) / chunk["filename"] for chunk in index["chunks"]]


def _read_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index["chunks"], list):
            raise TypeError
    except FileNotFoundError:
        raise ConvpipeError(
            f"no LitData {INDEX} found", f"in {folder}", "rerun `dvc repro --force prepare`"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConvpipeError(
            f"{INDEX} is not a LitData index", f"in {folder}", "rerun `dvc repro --force prepare`"
        ) from None
    return index


def item_count(folder: str | os.PathLike[str]) -> int:
    """Items a local split folder holds, from its index."""
    return sum(int(chunk["chunk_size"]) for chunk in _read_index(folder)["chunks"])


class StreamedImages:
    """A LitData split read by index, shaped like the ``npy`` format's memmap.

    Supports ``len()``, ``.shape``, ``.dtype`` and indexing by an int, a slice or an integer
    array, which is all that evaluation, augment and predict do with a split's images.

    Args:
        location: the split's folder or object-store URL.
        shape: ``(N, H, W, C)`` the manifest promises; a different item count is refused.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, location: str, shape: tuple[int, int, int, int]) -> None:
        self.location = location
        self.shape = shape
        self._dataset: Any = None

    def _open(self) -> Any:
        if self._dataset is None:
            self._dataset = open_split(self.location)
            if len(self._dataset) != self.shape[0]:
                raise ConvpipeError(
                    f"the split holds {len(self._dataset)} images, the manifest says "
                    f"{self.shape[0]}",
                    f"in {self.location}",
                    "rerun `dvc repro --force prepare` (or upload the prepared folder again)",
                )
        return self._dataset

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return np.asarray(self._open()[int(index) % self.shape[0]]["image"])
        rows = np.arange(self.shape[0])[index]
        return self._gather(np.atleast_1d(rows))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        dataset = self._open()
        out = np.empty((rows.size, *self.shape[1:]), dtype=np.uint8)
        for j, row in enumerate(rows.tolist()):
            out[j] = dataset[row]["image"]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._gather(np.arange(self.shape[0]))
        return array if dtype is None else array.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the split themselves
        return {"location": self.location, "shape": self.shape, "_dataset": None}


def open_split(location: str, **options: Any) -> Any:
    """A LitData :class:`~litdata.StreamingDataset` over one split (folder or URL).

    Raises:
        ConvpipeError: no LitData index there (or the object store refused to list it).
    """
    from litdata import StreamingDataset

    try:
        return StreamingDataset(location, **options)
    except Exception as exc:  # object-store clients (boto3, obstore, ...) raise their own kinds
        raise ConvpipeError(
            f"cannot open the LitData split ({mask(' '.join(str(exc).split())[:160])})",
            f"in {mask(location)}",
            "rerun `dvc repro prepare`, or check runtime.stream_from and its credentials",
        ) from None

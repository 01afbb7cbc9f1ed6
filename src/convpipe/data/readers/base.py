"""What every reader shares: the image readers and the helpers that build a dataset.

A reader only *finds* images and labels; decoding happens later through each split's
:class:`~convpipe.data.raw.ImageReader`, one of the classes here.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from convpipe.data.images import open_image, probe_image
from convpipe.data.raw import ImageInfo, ImageReader, RawDataset, RawSplit
from convpipe.errors import ConvpipeError

MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
Part = tuple[np.ndarray, ImageReader]  # the labels and the reader of one split


class ArrayReader:
    """An :class:`ImageReader` over images already held in a uint8 array.

    Args:
        array: ``(N, H, W)`` or ``(N, H, W, C)`` uint8 with ``C`` in 1..4; may be a
            read-only ``np.memmap`` (only the images asked for are paged in).
        source_file: The file the array came from; image ``i`` is named ``source_file#i``.
    """

    def __init__(self, array: np.ndarray, source_file: str) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(
                f"expected an (N, H, W[, C]) uint8 array, got {array.dtype} {array.shape}"
            )
        channels = 1 if array.ndim == 3 else array.shape[3]
        if channels not in MODES_BY_CHANNELS:
            raise ValueError(f"expected 1 to 4 channels, got {channels}")
        self._array = array
        self._mode = MODES_BY_CHANNELS[channels]
        self.source_file = source_file

    def __len__(self) -> int:
        """Number of images."""
        return int(self._array.shape[0])

    def name(self, index: int) -> str:
        """``source_file#index``."""
        return f"{self.source_file}#{index}"

    def probe(self, index: int) -> ImageInfo:
        """Size and mode of image ``index`` (the same for every image of the array)."""
        self._check(index)
        return ImageInfo(
            height=int(self._array.shape[1]), width=int(self._array.shape[2]), mode=self._mode
        )

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as an ``L``, ``LA``, ``RGB`` or ``RGBA`` Pillow image."""
        self._check(index)
        # A copy, so the image never keeps a whole memmap (and its file) alive.
        pixels = np.array(self._array[index])
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        return Image.fromarray(pixels)

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range 0..{len(self) - 1}")


class BatchesReader(ArrayReader):
    """An :class:`ArrayReader` over several files' arrays, concatenated.

    Image ``i`` is named after the file and the record it came from, so a message about
    image 30000 of CIFAR-10's train split points at ``data_batch_4#0``.
    """

    def __init__(self, arrays: Sequence[np.ndarray], files: Sequence[str]) -> None:
        super().__init__(np.concatenate(arrays), files[0])
        self._files = list(files)
        self._starts = list(itertools.accumulate((len(a) for a in arrays[:-1]), initial=0))

    def name(self, index: int) -> str:
        """``file#record`` of image ``index``."""
        batch = bisect.bisect_right(self._starts, index) - 1
        return f"{self._files[batch]}#{index - self._starts[batch]}"


class FileReader:
    """An :class:`ImageReader` over image files, decoded by :mod:`convpipe.data.images`.

    Args:
        paths: The image files, in label order.
        ignored: How many non-image files discovery passed over (for reports).
    """

    def __init__(self, paths: Sequence[str], ignored: int = 0) -> None:
        self.paths = list(paths)
        self.ignored = ignored

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def name(self, index: int) -> str:
        """The path of image ``index``."""
        return self.paths[index]

    def probe(self, index: int) -> ImageInfo:
        """Header of image ``index``. Raises :class:`BadFileError`."""
        return probe_image(self.paths[index])

    def load(self, index: int) -> Image.Image:
        """Decode image ``index``. Raises :class:`BadFileError`."""
        return open_image(self.paths[index])


def labelled(source: str, class_names: list[str], parts: dict[str, Part]) -> RawDataset:
    """The dataset of ``source``: each split's labels (as int64) and reader."""
    splits = {
        name: RawSplit(labels=np.asarray(labels, dtype=np.int64), reader=reader)
        for name, (labels, reader) in parts.items()
    }
    return RawDataset(source=source, class_names=class_names, splits=splits)


def existing(path: str, what: str, want_dir: bool) -> Path:
    """``path`` as a Path, checked to exist and to be a folder (or a file)."""
    found = Path(path).expanduser()
    kind = "folder" if want_dir else "file"
    if not found.exists():
        raise ConvpipeError(
            f"{what} not found: {found}", "in data.path", f"set data.path to an existing {kind}"
        )
    if want_dir and not found.is_dir():
        raise ConvpipeError(
            f"{what} must be a folder, got a file: {found}",
            "in data.path",
            "point data.path at the folder",
        )
    if not want_dir and found.is_dir():
        raise ConvpipeError(
            f"{what} must be a file, got a folder: {found}",
            "in data.path",
            "point data.path at the file",
        )
    return found

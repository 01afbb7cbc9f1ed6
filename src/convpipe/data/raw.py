"""The contract between the data sources and the prepare stage.

A source (``convpipe.data.sources``) turns ``data.source``/``data.path`` into a
:class:`RawDataset`: class names plus one :class:`RawSplit` per split the data already has
(``train``/``val``/``test``) or a single ``all`` split to be divided by prepare. Pixels are not
decoded up front: each split holds an :class:`ImageReader` that probes an image's size and mode
cheaply and decodes it on demand, so prepare can stream any number of images in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from convpipe.errors import ConvpipeError

SPLITS = ("train", "val", "test")
ALL = "all"


class BadFileError(ConvpipeError):
    """One input file (or one record inside a file) cannot be used as an image.

    Args:
        path: The file, with ``#index`` appended for a record inside a container file.
        reason: Why it is unusable (``empty file``, ``truncated image``, ``not an image``...).
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"unreadable image ({reason})",
            f"in {path}",
            "fix or remove the file, or set data.on_bad_file: skip",
        )


@dataclass(frozen=True)
class ImageInfo:
    """What probing an image tells without decoding its pixels."""

    height: int
    width: int
    mode: str  # a PIL mode: "L", "RGB", "RGBA", "P", "CMYK", "I;16", "I", "1", "LA", ...


class ImageReader(Protocol):
    """Lazy access to the images of one split, by position ``0 .. len-1``."""

    def __len__(self) -> int:
        """Number of images."""
        ...

    def name(self, index: int) -> str:
        """Where image ``index`` comes from (a file path, or ``file#record``), for messages."""
        ...

    def probe(self, index: int) -> ImageInfo:
        """Size and mode of image ``index``, cheaply. Raises :class:`BadFileError`."""
        ...

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` fully. Raises :class:`BadFileError`."""
        ...


@dataclass
class RawSplit:
    """The images of one split and their integer labels (``0 .. num_classes-1``)."""

    labels: np.ndarray  # (N,) int64
    reader: ImageReader


@dataclass
class RawDataset:
    """What a source found: class names, splits, and the files it had to skip."""

    source: str
    class_names: list[str]
    splits: dict[str, RawSplit]  # keys: "all", or a subset of SPLITS
    skipped: list[BadFileError] = field(default_factory=list)

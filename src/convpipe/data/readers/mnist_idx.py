"""The ``mnist_idx`` source: the four MNIST IDX files, raw or gzipped."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from convpipe.data.raw import RawDataset
from convpipe.data.readers.base import ArrayReader, Part, existing, labelled
from convpipe.errors import ConvpipeError
from convpipe.io import memory_bytes

_IDX_IMAGES = 0x00000803
_IDX_LABELS = 0x00000801
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_READ_BLOCK = 1 << 24


def _idx_error(
    path: Path, what: str, todo: str = "re-download or re-extract the file"
) -> ConvpipeError:
    return ConvpipeError(what, f"in {path}", todo)


def _find_idx(root: Path, name: str) -> Path | None:
    # Some mirrors (Kaggle) name the files "train-images.idx3-ubyte"; torchvision keeps
    # both the .gz and the extracted file, and the extracted one is cheaper to read.
    for stem in (name, name.replace("-idx", ".idx")):
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_dims(path: Path, head: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimensions in an IDX header, after checking its magic number."""
    if len(head) < 4:
        raise _idx_error(path, f"truncated IDX file: {len(head)} bytes, too short for a header")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise _idx_error(
            path,
            f"bad magic 0x{found:08x} (expected 0x{magic:08x})",
            "check the file is the one its name says (images vs labels) and not compressed twice",
        )
    if len(head) < 4 + 4 * ndim:
        raise _idx_error(path, f"truncated IDX header: {len(head)} bytes, expected {4 + 4 * ndim}")
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    if min(dims) == 0:
        raise _idx_error(path, f"IDX header has an empty dimension {dims}: the file holds no data")
    return tuple(int(d) for d in dims)


def _check_idx_size(path: Path, dims: tuple[int, ...], available: int) -> None:
    expected = math.prod(dims)
    if available < expected:
        raise _idx_error(
            path,
            f"truncated IDX file: header says {dims} = {expected} bytes of data, found {available}",
        )
    if available > expected:
        raise _idx_error(
            path,
            f"IDX file longer than its header says: {dims} = {expected} bytes, found {available}",
        )


# Deflate cannot expand a byte of input into more than ~1032 bytes of output (RFC 1951's
# longest match per 258-byte code): a header claiming more than that is lying.
DEFLATE_MAX_RATIO = 1032


def _check_gzip_room(path: Path, dims: tuple[int, ...], expected: int) -> None:
    """Refuse, before decompressing, a header claiming more data than the file can hold.

    Both bounds are checked: what deflate can expand the compressed file to, and half of
    this machine's memory (the data is held in memory while it is checked).
    """
    room = path.stat().st_size * DEFLATE_MAX_RATIO
    if expected > room:
        raise _idx_error(
            path,
            f"IDX header says {dims} = {expected} bytes of data, more than a gzip file of "
            f"{path.stat().st_size} bytes can hold ({room})",
        )
    memory = memory_bytes()
    if memory and expected > memory // 2:
        raise _idx_error(
            path,
            f"IDX data of {expected / 2**30:.1f} GiB does not fit in half of this machine's "
            f"{memory / 2**30:.1f} GiB once decompressed",
            "store it uncompressed: an uncompressed IDX file is memory-mapped",
        )


def _gunzip_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            dims = _idx_dims(path, fh.read(4 + 4 * ndim), magic, ndim)
            expected = math.prod(dims)
            _check_gzip_room(path, dims, expected)
            data = bytearray()
            # Read in blocks up to one byte past the header's size, so a lying header can
            # neither allocate huge memory up front nor hide trailing data.
            while len(data) <= expected and (
                block := fh.read(min(_READ_BLOCK, expected + 1 - len(data)))
            ):
                data += block
    except (OSError, EOFError, zlib.error) as exc:
        raise _idx_error(path, f"not a valid gzip file or truncated ({exc})") from None
    _check_idx_size(path, dims, len(data))
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _map_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            dims = _idx_dims(path, fh.read(4 + 4 * ndim), magic, ndim)
            size = os.fstat(fh.fileno()).st_size
        _check_idx_size(path, dims, size - 4 - 4 * ndim)
        # A memmap keeps prepare's memory flat: pages are read as images are asked for.
        return np.memmap(path, dtype=np.uint8, mode="r", offset=4 + 4 * ndim, shape=dims)
    except OSError as exc:
        raise _idx_error(
            path, f"cannot read IDX file: {exc.strerror or exc}", "check the file is readable"
        ) from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of uint8 (``magic`` 0x803 for images, 0x801 for labels).

    Args:
        path: The file; a ``.gz`` name is decompressed into memory, others are memory-mapped.
        magic: The expected magic number; its low byte is the number of dimensions.

    Returns:
        A uint8 array with the header's dimensions.

    Raises:
        ConvpipeError: bad magic, truncated header or data, trailing data, bad gzip.
    """
    ndim = magic & 0xFF
    if path.suffix == ".gz":
        return _gunzip_idx(path, magic, ndim)
    return _map_idx(path, magic, ndim)


def _mnist_paths(root: Path) -> dict[str, tuple[Path, Path]]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in (name for pair in _MNIST_FILES.values() for name in pair):
        path = _find_idx(root, name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise ConvpipeError(
            f"missing MNIST file(s) {', '.join(missing)} (raw or .gz)",
            f"in {root}",
            "the folder needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may end in .gz)",
        )
    return {
        split: (found[images], found[labels]) for split, (images, labels) in _MNIST_FILES.items()
    }


def open_mnist_idx(path: str) -> RawDataset:
    """The MNIST IDX files (or any dataset in that format, e.g. Fashion-MNIST).

    Args:
        path: The folder holding the four files, raw or gzipped.

    Returns:
        Splits ``train`` and ``test``; classes ``"0"`` .. ``str(max label)``.

    Raises:
        ConvpipeError: missing files, bad magic, truncated files, or image and label
            counts that differ.
    """
    root = existing(path, "MNIST folder", want_dir=True)
    parts: dict[str, Part] = {}
    for split, (images_path, labels_path) in _mnist_paths(root).items():
        images = read_idx(images_path, _IDX_IMAGES)
        labels = read_idx(labels_path, _IDX_LABELS)
        if len(images) != len(labels):
            raise ConvpipeError(
                f"{images_path.name} has {len(images)} images but "
                f"{labels_path.name} has {len(labels)} labels",
                f"in {root}",
                "the two files must come from the same release; re-download them",
            )
        parts[split] = (np.asarray(labels, dtype=np.int64), ArrayReader(images, str(images_path)))
    top = max(int(labels.max()) for labels, _ in parts.values())
    return labelled("mnist_idx", [str(i) for i in range(top + 1)], parts)

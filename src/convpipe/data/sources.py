"""The data sources of the prepare stage: ``data.source`` + ``data.path`` -> :class:`RawDataset`.

Five sources are supported:

* ``digits``: scikit-learn's bundled 8x8 digits (no download, no path).
* ``imagefolder``: ``path/<class>/**/<image>`` or ``path/{train,val,test}/<class>/...``.
* ``mnist_idx``: the four MNIST IDX files, raw or gzipped.
* ``cifar``: the python versions of CIFAR-10 or CIFAR-100 (read through a restricted unpickler).
* ``csv``: one image per row, ``label,p0,p1,...`` (Kaggle MNIST style).

Sources only *find* images and labels; decoding happens later through each split's
:class:`~convpipe.data.raw.ImageReader`. Everything a user can get wrong (a missing folder, a
bad magic number, a short row) raises one :class:`~convpipe.errors.ConvpipeError` naming the
file or folder, what was expected and what to do.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from convpipe.config import DataParams
from convpipe.data.images import IMAGE_EXTENSIONS, is_image_file, open_image, probe_image
from convpipe.data.raw import ALL, SPLITS, ImageInfo, ImageReader, RawDataset, RawSplit
from convpipe.data.safe_pickle import restricted_load
from convpipe.errors import ConvpipeError

_MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_Part = tuple[np.ndarray, ImageReader]  # the labels and the reader of one split


# --------------------------------------------------------------------------- readers


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
        if channels not in _MODES_BY_CHANNELS:
            raise ValueError(f"expected 1 to 4 channels, got {channels}")
        self._array = array
        self._mode = _MODES_BY_CHANNELS[channels]
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


class _BatchesReader(ArrayReader):
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


# --------------------------------------------------------------------------- entry point


def open_source(params: DataParams) -> RawDataset:
    """Find the images and labels ``params.source`` and ``params.path`` describe.

    Args:
        params: The ``data`` section of ``params.yaml``.

    Returns:
        Class names and one split per split present in the data (``all`` when the data
        has none). Labels are int64 in ``0 .. len(class_names) - 1``.

    Raises:
        ConvpipeError: for a missing or malformed source, naming the file or folder.
    """
    if params.source == "digits":
        return open_digits()
    if not params.path:
        raise ConvpipeError(
            f"data.path is required for data.source '{params.source}', got null",
            "in params.yaml",
            "set data.path to the dataset's file or folder",
        )
    openers: dict[str, Callable[[str], RawDataset]] = {
        "imagefolder": open_imagefolder,
        "mnist_idx": open_mnist_idx,
        "cifar": open_cifar,
        "csv": lambda path: open_csv(path, params.csv.image_shape, params.csv.label_column),
    }
    return openers[params.source](params.path)


def _labelled(source: str, class_names: list[str], parts: dict[str, _Part]) -> RawDataset:
    splits = {
        name: RawSplit(labels=np.asarray(labels, dtype=np.int64), reader=reader)
        for name, (labels, reader) in parts.items()
    }
    return RawDataset(source=source, class_names=class_names, splits=splits)


def _existing(path: str, what: str, want_dir: bool) -> Path:
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


# --------------------------------------------------------------------------- digits


def open_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits: 1797 images, classes ``"0"`` .. ``"9"``, split ``all``.

    The 0..16 intensities are scaled to 0..255 with ``round(v * 255 / 16)``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
    names = [str(name) for name in bunch.target_names]
    reader = ArrayReader(images, "sklearn-digits")
    return _labelled("digits", names, {ALL: (bunch.target, reader)})


# --------------------------------------------------------------------------- imagefolder


@dataclass
class _Found:
    """Image files found under one split folder, per class folder name."""

    files: dict[str, list[str]]
    ignored: int


def _entries(folder: Path | str) -> list[os.DirEntry[str]]:
    """The non-hidden entries of ``folder``, sorted by name."""
    try:
        with os.scandir(folder) as scan:
            return sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise ConvpipeError(
            f"cannot list folder: {exc.strerror or exc}",
            f"in {folder}",
            "check it exists and is readable",
        ) from None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    # Follows symlinks: a linked class folder is a class folder. A broken or looping link
    # is not a folder; if it has an image name it is listed and reported when read.
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk_images(folder: str) -> tuple[list[str], int]:
    """Image files anywhere under ``folder`` (sorted) and the count of other files.

    Symlinked folders are followed, but each real folder is visited once and links back to
    ``folder`` or its ancestors are skipped, so symlink loops cannot make discovery hang.
    """
    top = os.path.realpath(folder)
    seen = {top}
    pending = [folder]
    files: list[str] = []
    ignored = 0
    while pending:
        for entry in _entries(pending.pop()):
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real not in seen and os.path.commonpath([top, real]) != real:
                    seen.add(real)
                    pending.append(entry.path)
            elif is_image_file(entry.name):
                files.append(entry.path)
            else:
                ignored += 1
    return sorted(files), ignored


def _layout_hint(folder: Path) -> str:
    return f"expected {folder}/<class>/<images> or {folder}/train/<class>/<images>"


def _scan_classes(folder: Path) -> _Found:
    """The class folders directly under ``folder`` and the images each holds."""
    entries = _entries(folder)
    class_dirs = [e for e in entries if _is_dir(e)]
    loose = [e.name for e in entries if not _is_dir(e) and is_image_file(e.name)]
    if loose:
        state = "beside class folders" if class_dirs else "and no class folders"
        raise ConvpipeError(
            f"found images directly in the folder ({loose[0]}, ...) {state}",
            f"in {folder}",
            f"move each image into a folder named after its class: {_layout_hint(folder)}",
        )
    if not class_dirs:
        raise ConvpipeError("no class folders", f"in {folder}", _layout_hint(folder))
    found = _Found(files={}, ignored=len(entries) - len(class_dirs))
    for entry in class_dirs:
        files, ignored = _walk_images(entry.path)
        if not files:
            raise ConvpipeError(
                f"class folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                f"in {entry.path}",
                "add images or remove the folder",
            )
        found.files[entry.name] = files
        found.ignored += ignored
    return found


def _split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}``: ``{"all": root}`` for flat data, else the split subfolders."""
    entries = _entries(root)
    dirs = {e.name for e in entries if _is_dir(e)}
    given = [s for s in SPLITS if s in dirs]
    if not given:
        return {ALL: root}
    loose = [e.name for e in entries if not _is_dir(e) and is_image_file(e.name)]
    others = sorted(dirs - set(SPLITS))
    if others or loose:
        raise ConvpipeError(
            f"split folders ({', '.join(given)}) mixed with other entries "
            f"({(others + loose)[0]}, ...)",
            f"in {root}",
            "put every class folder inside train/ (and val/, test/), or use no split folders",
        )
    if "train" not in given:
        raise ConvpipeError(
            f"split folders {', '.join(given)} found but no train folder",
            f"in {root}",
            f"add {root}/train/<class>/<images>",
        )
    return {split: root / split for split in given}


def open_imagefolder(path: str) -> RawDataset:
    """Images in one folder per class, optionally inside ``train``/``val``/``test`` folders.

    Classes are the sorted union of the class folder names of all splits. Class folders
    are searched recursively; hidden entries (leading ``.``) and files without an image
    extension are ignored (their count is ``FileReader.ignored``). Files are sorted, so
    the order never depends on the file system.

    Args:
        path: The dataset folder.

    Raises:
        ConvpipeError: missing folder, a file instead of a folder, no class folders, an
            empty class folder, or images mixed with class or split folders.
    """
    root = _existing(path, "image folder", want_dir=True)
    found = {split: _scan_classes(folder) for split, folder in _split_folders(root).items()}
    class_names = sorted(set().union(*(f.files for f in found.values())))
    index = {name: i for i, name in enumerate(class_names)}
    parts: dict[str, _Part] = {}
    for split, result in found.items():
        paths = [p for name in sorted(result.files) for p in result.files[name]]
        labels = [index[name] for name in sorted(result.files) for _ in result.files[name]]
        parts[split] = (np.asarray(labels, dtype=np.int64), FileReader(paths, result.ignored))
    return _labelled("imagefolder", class_names, parts)


# --------------------------------------------------------------------------- mnist_idx

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


def _gunzip_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            dims = _idx_dims(path, fh.read(4 + 4 * ndim), magic, ndim)
            expected = math.prod(dims)
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
    root = _existing(path, "MNIST folder", want_dir=True)
    parts: dict[str, _Part] = {}
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
    return _labelled("mnist_idx", [str(i) for i in range(top + 1)], parts)


# --------------------------------------------------------------------------- cifar


@dataclass(frozen=True)
class _CifarLayout:
    kind: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str

    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


_CIFAR10 = _CifarLayout(
    "CIFAR-10",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    "labels",
    "label_names",
)
_CIFAR100 = _CifarLayout("CIFAR-100", ("train",), "test", "meta", "fine_labels", "fine_label_names")
_CIFAR_SIDE = 32
_CIFAR_VALUES = 3 * _CIFAR_SIDE * _CIFAR_SIDE


def _cifar_layout(root: Path) -> _CifarLayout:
    """Which CIFAR a folder holds, after checking all its files are there."""
    layout = next(
        (lay for lay in (_CIFAR10, _CIFAR100) if any((root / f).is_file() for f in lay.files())),
        None,
    )
    if layout is None:
        inner = [d for d in ("cifar-10-batches-py", "cifar-100-python") if (root / d).is_dir()]
        hint = (
            f"did you mean data.path: {root / inner[0]}?"
            if inner
            else "point data.path at the extracted python version"
        )
        raise ConvpipeError(
            "no CIFAR files: expected data_batch_1..5, test_batch, batches.meta (CIFAR-10) "
            "or train, test, meta (CIFAR-100)",
            f"in {root}",
            hint,
        )
    missing = [f for f in layout.files() if not (root / f).is_file()]
    if missing:
        raise ConvpipeError(
            f"incomplete {layout.kind} folder: missing {', '.join(missing)}",
            f"in {root}",
            "re-extract the python version of the dataset",
        )
    return layout


def _load_dict(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as fh:
            batch = restricted_load(fh, str(path))
    except OSError as exc:
        raise ConvpipeError(
            f"cannot read CIFAR file: {exc.strerror or exc}", f"in {path}", "check it is readable"
        ) from None
    if not isinstance(batch, dict):
        raise ConvpipeError(
            f"expected a pickled dict, got {type(batch).__name__}",
            f"in {path}",
            "is this a CIFAR python batch?",
        )
    return batch


def _entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    # The original batches were pickled by Python 2 (bytes keys); re-pickled copies made
    # with Python 3 have str keys. Both hold the same data.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ConvpipeError(
        f"CIFAR file has no '{key}' entry", f"in {path}", "is this the right CIFAR variant?"
    )


def _cifar_names(path: Path, key: str) -> list[str]:
    names = _entry(_load_dict(path), key, path)
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise ConvpipeError(
            f"'{key}' is not a list of class names", f"in {path}", "re-extract the dataset"
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _cifar_batch(
    path: Path, layout: _CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` (a strided view) and labels ``(N,)`` of one batch file."""
    batch = _load_dict(path)
    data = _entry(batch, "data", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_VALUES
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConvpipeError(
            f"'data' must be an (N, {_CIFAR_VALUES}) uint8 array, got {got}",
            f"in {path}",
            "re-extract the dataset",
        )
    labels = np.asarray(_entry(batch, layout.label_key, path))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(data):
        raise ConvpipeError(
            f"'{layout.label_key}' must hold {len(data)} integers (one per image), "
            f"got {labels.dtype} {labels.shape}",
            f"in {path}",
            "re-extract the dataset",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConvpipeError(
            f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}",
            f"in {path}",
            "the batch and the meta file come from different datasets",
        )
    # Rows are stored channel-major (all red, then green, then blue); images want HWC.
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def open_cifar(path: str) -> RawDataset:
    """The python version of CIFAR-10 or CIFAR-100, detected from the file names.

    CIFAR-10 has ``data_batch_1..5``, ``test_batch`` and ``batches.meta``; CIFAR-100 has
    ``train``, ``test`` and ``meta`` (its fine labels are used).

    Every file is read through :func:`~convpipe.data.safe_pickle.restricted_load`.

    Args:
        path: The extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``).

    Returns:
        Splits ``train`` and ``test`` of 32x32 RGB images.

    Raises:
        ConvpipeError: unknown or incomplete folder, unsafe or broken pickle, bad shapes.
    """
    root = _existing(path, "CIFAR folder", want_dir=True)
    layout = _cifar_layout(root)
    class_names = _cifar_names(root / layout.meta, layout.names_key)
    train = [_cifar_batch(root / name, layout, len(class_names)) for name in layout.train]
    test_images, test_labels = _cifar_batch(root / layout.test, layout, len(class_names))
    train_reader = _BatchesReader(
        [images for images, _ in train], [str(root / n) for n in layout.train]
    )
    parts: dict[str, _Part] = {
        "train": (np.concatenate([labels for _, labels in train]), train_reader),
        "test": (
            test_labels,
            ArrayReader(np.ascontiguousarray(test_images), str(root / layout.test)),
        ),
    }
    return _labelled("cifar", class_names, parts)


# --------------------------------------------------------------------------- csv

_CSV_CHUNK_ROWS = 4096
_HEADER_WORDS = frozenset({"label", "labels", "class", "target", "y", "digit", "category"})


@dataclass(frozen=True)
class _CsvLayout:
    path: Path
    fields: int  # per row: the label plus the pixels
    label_column: int

    def pixel_columns(self) -> list[int]:
        return [c for c in range(self.fields) if c != self.label_column]

    def error(self, line: int, what: str) -> ConvpipeError:
        return ConvpipeError(
            f"line {line}: {what}",
            f"in {self.path}",
            f"each row must be {self.fields} comma-separated fields: a label at column "
            f"{self.label_column} and {self.fields - 1} integer pixels 0..255 "
            "(see data.csv.image_shape)",
        )


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_pixel(text: str) -> bool:
    try:
        return 0 <= int(text) <= 255
    except ValueError:
        return False


def _is_header(fields: list[str], layout: _CsvLayout) -> bool:
    """Whether the first row names the columns instead of holding an image.

    A row with an integer label is data (a bad pixel in it is an error, not a header).
    Otherwise it is a header when its pixels are not all integers 0..255 or its label is a
    column name such as ``label``: labels may be words (``cat``), so a non-integer label
    alone does not make a header.
    """
    if len(fields) <= layout.label_column:
        return False
    label = fields[layout.label_column].strip()
    if _is_integer(label):
        return False
    pixels = [f for i, f in enumerate(fields) if i != layout.label_column]
    return not all(_is_pixel(p) for p in pixels) or label.lower() in _HEADER_WORDS


def _diagnose(chunk: list[str], first_line: int, layout: _CsvLayout) -> ConvpipeError:
    """The error for the first bad row of a chunk the fast parser rejected."""
    for line, text in enumerate(chunk, start=first_line):
        if not text.strip():
            continue
        fields = text.rstrip("\r\n").split(",")
        if len(fields) != layout.fields:
            return layout.error(line, f"{len(fields)} fields, expected {layout.fields}")
        if not fields[layout.label_column].strip():
            return layout.error(line, "empty label")
        for column in layout.pixel_columns():
            if not _is_pixel(fields[column]):
                return layout.error(
                    line,
                    f"column {column}: pixel {fields[column].strip()!r} is not an integer 0..255",
                )
    return layout.error(first_line, f"unreadable rows {first_line}..{first_line + len(chunk) - 1}")


def _parse_chunk(rows: list[str], layout: _CsvLayout) -> tuple[list[str], np.ndarray]:
    """Labels and ``(rows, pixels)`` uint8 of well-formed rows; ValueError for any bad row."""
    if any(row.count(",") != layout.fields - 1 for row in rows):
        raise ValueError("wrong field count")
    cut = layout.label_column
    labels = [row.split(",", cut + 1)[cut].strip() for row in rows]
    if not all(labels):
        raise ValueError("empty label")
    # int16 holds every valid pixel and turns absurd values into a parse error.
    pixels = np.loadtxt(
        rows, delimiter=",", dtype=np.int16, usecols=layout.pixel_columns(), comments=None, ndmin=2
    )
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("pixel out of range")
    return labels, pixels.astype(np.uint8)


def _csv_chunks(fh: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """``(number of the first line, lines)`` of the file, a bounded number at a time."""
    line = 1
    while chunk := list(itertools.islice(fh, _CSV_CHUNK_ROWS)):
        yield line, chunk
        line += len(chunk)


def _read_csv(fh: IO[str], layout: _CsvLayout) -> tuple[list[str], np.ndarray]:
    labels: list[str] = []
    blocks: list[np.ndarray] = []
    first = True
    for first_line, chunk in _csv_chunks(fh):
        if first and chunk[0].strip() and _is_header(chunk[0].rstrip("\r\n").split(","), layout):
            header = chunk[0].count(",") + 1
            if header != layout.fields:
                raise layout.error(1, f"header has {header} columns, expected {layout.fields}")
            first_line, chunk = first_line + 1, chunk[1:]
        first = False
        rows = [row for row in chunk if row.strip()]
        if not rows:
            continue
        try:
            chunk_labels, pixels = _parse_chunk(rows, layout)
        except ValueError:
            raise _diagnose(chunk, first_line, layout) from None
        labels += chunk_labels
        blocks.append(pixels)
    if not blocks:
        raise ConvpipeError("CSV file has no data rows", f"in {layout.path}", "check data.path")
    return labels, np.concatenate(blocks)


def _class_indices(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each row's index into them (numeric order for integer labels)."""
    text = np.asarray(labels)
    try:
        values = text.astype(np.int64)
    except ValueError:
        names, inverse = np.unique(text, return_inverse=True)
        return [str(n) for n in names], inverse.astype(np.int64)
    numbers, inverse = np.unique(values, return_inverse=True)
    return [str(n) for n in numbers], inverse.astype(np.int64)


def open_csv(path: str, image_shape: Sequence[int], label_column: int) -> RawDataset:
    """A CSV file of one image per row, ``label,p0,p1,...`` (Kaggle MNIST ``train.csv`` style).

    The first row is skipped as a header when its pixel fields are not integers 0..255 or
    its label is a column name (``label``, ``class``...). Parsing is vectorised per chunk
    of rows; only a chunk that fails is re-read row by row to report the exact line.

    Args:
        path: The CSV file.
        image_shape: ``(H, W)`` or ``(H, W, C)`` of each row's pixels, row-major.
        label_column: Index of the label field in each row.

    Returns:
        Split ``all``. Class names are the distinct labels, sorted numerically when all
        are integers, else as text.

    Raises:
        ConvpipeError: a missing file, an image shape or label column that does not fit,
            or a row with the wrong field count, an empty label or a bad pixel (with its
            line number).
    """
    file = _existing(path, "CSV file", want_dir=False)
    shape = tuple(int(d) for d in image_shape)
    if len(shape) == 3 and shape[2] not in _MODES_BY_CHANNELS:
        raise ConvpipeError(
            f"data.csv.image_shape must have 1 to 4 channels, got {list(shape)}",
            "in params.yaml",
            "use [H, W] or [H, W, 3]",
        )
    layout = _CsvLayout(path=file, fields=math.prod(shape) + 1, label_column=label_column)
    if label_column >= layout.fields:
        raise ConvpipeError(
            f"data.csv.label_column {label_column} is past the last of {layout.fields} fields",
            "in params.yaml",
            "set it to the label's 0-based column",
        )
    try:
        with open(file, encoding="utf-8-sig", newline=None) as fh:
            labels, pixels = _read_csv(fh, layout)
    except UnicodeDecodeError as exc:
        raise ConvpipeError(
            f"not a UTF-8 text file ({exc.reason})", f"in {file}", "is data.path a CSV file?"
        ) from None
    except OSError as exc:
        raise ConvpipeError(
            f"cannot read CSV file: {exc.strerror or exc}", f"in {file}", "check it is readable"
        ) from None
    class_names, indices = _class_indices(labels)
    reader = ArrayReader(pixels.reshape(len(pixels), *shape), str(file))
    return _labelled("csv", class_names, {ALL: (indices, reader)})

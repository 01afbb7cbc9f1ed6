"""Test data generators: real-format datasets and deliberately broken files.

Every dataset is built from scikit-learn's bundled digits (no download), upscaled where a
format expects bigger images. Each writer takes a target folder (or file) and returns the
path a test passes as ``data.path`` (or the file it wrote), so any test can build exactly
the input it needs in ``tmp_path``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "jpg": {"quality": 95, "subsampling": 0},
    "jpeg": {"quality": 95, "subsampling": 0},
    "webp": {"lossless": True},
}


# --------------------------------------------------------------------------- digits


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


@functools.cache
def _digits_at(size: int) -> np.ndarray:
    images, _ = _digits()
    if size == 8:
        return images
    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
            for im in images
        ]
    )


def digit_images(n: int, size: int = 8, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits from position ``start`` (wrapping): ``(n, size, size)`` uint8 and labels."""
    images, labels = _digits_at(size), _digits()[1]
    picks = (start + np.arange(n)) % len(labels)
    return images[picks].copy(), labels[picks].copy()


def digits_of_class(digit: int, n: int, size: int = 8) -> np.ndarray:
    """``n`` distinct images of one digit (``(n, size, size)`` uint8)."""
    _, labels = _digits()
    picks = np.flatnonzero(labels == digit)[:n]
    return _digits_at(size)[picks].copy()


def colorize(gray: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` gray -> ``(..., H, W, 3)`` with three *different* channels.

    R = gray, G = gray // 2, B = 255 - gray: any channel mix-up (CHW vs HWC, RGB vs BGR)
    shows up as a wrong relation between the channels.
    """
    return np.stack([gray, gray // 2, 255 - gray], axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------- imagefolder


def save_image(pixels: np.ndarray, path: Path, fmt: str | None = None) -> Path:
    """Save a uint8 ``(H, W)`` or ``(H, W, 3)`` array; the format comes from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = (fmt or path.suffix.lstrip(".")).lower()
    Image.fromarray(pixels).save(path, **_SAVE_OPTIONS.get(suffix, {}))
    return path


def write_imagefolder(
    root: Path,
    fmt: str = "png",
    layout: str = "flat",
    n_per_class: int = 3,
    classes: Sequence[str] = ("0", "1", "2"),
    size: int = 16,
    color: bool = False,
    splits: Sequence[str] = ("train", "val", "test"),
) -> Path:
    """Write ``root/<class>/<class>_<k>.<fmt>`` (flat) or ``root/<split>/<class>/...`` (split).

    Class ``c`` holds digit ``int(c) % 10`` when ``c`` is numeric, else the digit at its
    position in ``classes``. Files are named ``[<split>_]<class>_<k>``, so they sort by ``k``.

    Returns:
        ``root``.
    """
    folders = [(root, "")] if layout == "flat" else [(root / s, f"{s}_") for s in splits]
    for split_index, (folder, prefix) in enumerate(folders):
        for position, name in enumerate(classes):
            digit = int(name) % 10 if name.isdigit() else position % 10
            images = digits_of_class(digit, n_per_class * (split_index + 1), size)[-n_per_class:]
            for k, image in enumerate(images):
                pixels = colorize(image) if color else image
                save_image(pixels, folder / name / f"{prefix}{name}_{k:03d}.{fmt}")
    return root


# --------------------------------------------------------------------------- MNIST IDX


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one big-endian uint32 per dimension, the uint8 data."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_file(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    """Write one IDX file (gzipped when ``gz``, with ``.gz`` appended to the name)."""
    data = idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)
    return path


def write_idx(
    root: Path, gz: bool = False, n_train: int = 60, n_test: int = 20, size: int = 28
) -> Path:
    """Write MNIST's four IDX files (train and t10k) from digits upscaled to ``size``.

    Returns:
        ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, start in (("train", n_train, 0), ("t10k", n_test, n_train)):
        images, labels = digit_images(n, size, start)
        write_idx_file(root / f"{prefix}-images-idx3-ubyte", images, IDX_IMAGES_MAGIC, gz)
        write_idx_file(
            root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), IDX_LABELS_MAGIC, gz
        )
    return root


# --------------------------------------------------------------------------- CIFAR


class _Py2StylePickler(pickle._Pickler):
    """Pickles the way Python 2 + numpy 1.x wrote the original CIFAR batches.

    ``bytes`` become ``BINSTRING`` opcodes (Python 2 ``str``) and numpy globals use the
    old ``numpy.core`` module path, so the tests exercise the real file format rather than
    what Python 3 would write.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py2_style_pickle(obj: Any) -> bytes:
    """``obj`` pickled with protocol 2 as Python 2 would have written it."""
    import io

    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """``(N, 32, 32, 3)`` images -> CIFAR's ``(N, 3072)`` rows (all R, then G, then B)."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).reshape(len(images_hwc), -1)


def _cifar_batch(n: int, start: int, label_key: str) -> dict[bytes, Any]:
    gray, labels = digit_images(n, 32, start)
    return {
        b"batch_label": b"generated batch",
        label_key.encode(): [int(v) for v in labels],
        b"data": cifar_rows(colorize(gray)),
        b"filenames": [f"img_{start + i}.png".encode() for i in range(n)],
    }


def write_cifar(
    root: Path, kind: str = "cifar10", n: int = 25, n_test: int = 10, py2: bool = True
) -> Path:
    """Write a CIFAR-10 (``data_batch_1..5``...) or CIFAR-100 (``train``...) python folder.

    Images are digits at 32x32 through :func:`colorize`; labels are the digits (CIFAR-100
    uses 10 of its 100 fine classes). ``n`` train images are spread over the batches.

    Args:
        root: The folder to create.
        kind: ``"cifar10"`` or ``"cifar100"``.
        n: Train images in total (CIFAR-10: at least 5).
        n_test: Test images.
        py2: Pickle like Python 2 (the real files); else with Python 3's protocol 2.

    Returns:
        ``root``.
    """
    dump = py2_style_pickle if py2 else functools.partial(pickle.dumps, protocol=2)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        meta = {b"label_names": [name.encode() for name in CIFAR10_NAMES], b"num_vis": 3072}
        files = {"batches.meta": meta, "test_batch": _cifar_batch(n_test, n, "labels")}
        bounds = np.linspace(0, n, 6).astype(int)
        for i in range(5):
            count = int(bounds[i + 1] - bounds[i])
            files[f"data_batch_{i + 1}"] = _cifar_batch(count, int(bounds[i]), "labels")
    else:
        meta = {
            b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
        }
        files = {
            "meta": meta,
            "train": _cifar_batch(n, 0, "fine_labels"),
            "test": _cifar_batch(n_test, n, "fine_labels"),
        }
    for name, content in files.items():
        (root / name).write_bytes(dump(content))
    return root


# --------------------------------------------------------------------------- CSV


def write_csv(
    path: Path,
    header: bool = True,
    n: int = 30,
    image_shape: Sequence[int] = (8, 8),
    label_column: int = 0,
    labels: Sequence[str] | None = None,
    line_end: str = "\n",
) -> Path:
    """Write ``label,p0,p1,...`` rows (Kaggle MNIST style) from 8x8 digits.

    ``image_shape`` must hold 64 pixels per channel-free image; a 3-channel shape repeats
    each digit through :func:`colorize`. ``labels`` replaces the digit labels (as text).

    Returns:
        ``path``.
    """
    gray, digits = digit_images(n, 8)
    pixels = colorize(gray) if len(image_shape) == 3 else gray
    rows = pixels.reshape(n, -1)
    texts = (
        [str(d) for d in digits]
        if labels is None
        else [str(labels[i % len(labels)]) for i in range(n)]
    )
    lines = []
    if header:
        names = [f"pixel{i}" for i in range(rows.shape[1])]
        names.insert(label_column, "label")
        lines.append(",".join(names))
    for text, row in zip(texts, rows, strict=True):
        fields = [str(int(v)) for v in row]
        fields.insert(label_column, text)
        lines.append(",".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((line_end.join(lines) + line_end).encode())
    return path


# --------------------------------------------------------------------------- bad files


def write_zero_byte(root: Path, name: str = "empty.png") -> Path:
    """A 0-byte file with an image name."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_not_an_image(root: Path, name: str = "notes.png") -> Path:
    """A text file with an image name."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("these are notes, not pixels\n" * 20)
    return path


def write_truncated_png(root: Path, name: str = "truncated.png") -> Path:
    """A PNG whose header is intact but whose pixel data stops halfway.

    Random pixels keep the compressed data large, so the cut falls inside IDAT.
    """
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    path = save_image(pixels, root / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_16bit_png(
    root: Path, values: Sequence[Sequence[int]] = ((0, 257, 32896, 65535),), name: str = "deep.png"
) -> Path:
    """A 16-bit grayscale PNG holding ``values`` (rows of 0..65535)."""
    return save_image(np.asarray(values, dtype=np.uint16), root / name)


def write_cmyk_jpeg(root: Path, name: str = "cmyk.jpg") -> Path:
    """A 16x16 CMYK JPEG: left half white (0,0,0,0), right half red (0,255,255,0)."""
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, 8:, 1:3] = 255
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("CMYK", (16, 16), pixels.tobytes()).save(path, quality=100)
    return path


RGBA_PIXELS = np.array(
    [[[200, 100, 50, 255], [200, 100, 50, 128]], [[200, 100, 50, 0], [10, 20, 30, 255]]],
    dtype=np.uint8,
)


def write_rgba_png(root: Path, name: str = "rgba.png") -> Path:
    """A 2x2 RGBA PNG of :data:`RGBA_PIXELS` (opaque, half and fully transparent pixels)."""
    return save_image(RGBA_PIXELS, root / name)


PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
PALETTE_INDICES = np.array([[0, 1], [2, 3]], dtype=np.uint8)
PALETTE_TRANSPARENT = 2


def write_palette_png(root: Path, name: str = "palette.png") -> Path:
    """A 2x2 palette PNG: black, red / green (transparent index), blue."""
    image = Image.frombytes("P", (2, 2), PALETTE_INDICES.tobytes())
    image.putpalette([c for rgb in PALETTE for c in rgb])
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, transparency=PALETTE_TRANSPARENT)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_decompression_bomb(
    root: Path, width: int = 20000, height: int = 20000, name: str = "bomb.png"
) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` 1-bit pixels.

    The default 400 M pixels is over twice Pillow's default limit, so ``Image.open``
    refuses it from the header alone: the test never allocates the pixels. Between 1x and
    2x the limit Pillow only warns.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
    data += _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_fifo(root: Path, name: str = "pipe.png") -> Path:
    """A named pipe with an image name: open() of it blocks until a writer comes."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# A PostScript program: Pillow identifies it as EPS and hands it to Ghostscript where installed.
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto showpage\n"


def write_postscript(root: Path, name: str = "doc.png") -> Path:
    """A PostScript file with an image name."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(POSTSCRIPT)
    return path


def write_symlink_loop(root: Path) -> list[Path]:
    """Symlinks that loop: ``self.png -> self.png`` and ``loop -> .`` / ``sub/up -> ..``.

    Returns:
        The three links.
    """
    (root / "sub").mkdir(parents=True, exist_ok=True)
    links = [root / "self.png", root / "loop", root / "sub" / "up"]
    for link, target in zip(links, ("self.png", ".", ".."), strict=True):
        os.symlink(target, link)
    return links


def write_numbered_csv(path: Path, n: int, classes: int = 4) -> Path:
    """``n`` 8x8 images in a headerless CSV, each telling its row: pixels 0 and 1 hold
    ``i % 256`` and ``i // 256``, the rest a seeded pattern; class ``i % classes``.

    For tests that follow single images through splits, shards and epochs
    (:func:`image_number` reads the number back).
    """
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 64), dtype=np.int64)
    pixels[:, 0] = np.arange(n) % 256
    pixels[:, 1] = np.arange(n) // 256
    lines = [",".join(map(str, [i % classes, *row])) for i, row in enumerate(pixels.tolist())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def image_number(images: np.ndarray) -> np.ndarray:
    """The row numbers :func:`write_numbered_csv` wrote into uint8 ``(N, 8, 8, 1)`` images."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1]

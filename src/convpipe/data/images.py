"""Opening image files safely and normalising any Pillow image to a fixed uint8 array.

Everything a user can put in an image folder is untrusted: empty files, truncated downloads,
text files with a ``.png`` name, decompression bombs, symlink loops, files deleted while the
stage runs. :func:`open_image` and :func:`probe_image` turn each of these into a
:class:`~convpipe.data.raw.BadFileError` with a short reason, so prepare can stop or skip
the file (``data.on_bad_file``) instead of crashing or silently training on garbage.

:func:`normalize` then maps every Pillow mode the project accepts (L, RGB, RGBA, LA, P,
CMYK, 1, 16-bit, 32-bit int and float...) to an ``(H, W, C)`` uint8 array with the requested
channel count and size.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, get_args

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from convpipe.config.schema import ResizeMode
from convpipe.data.raw import BadFileError, ImageInfo

# The Pillow decoders each extension may use: a file is decoded only by the format its name
# claims, never by whatever Pillow detects in its bytes (a PostScript file named .png would
# otherwise go to Ghostscript). JPEG's decoder also opens cameras' multi-picture (MPO) files.
FORMATS_OF_EXTENSION: dict[str, tuple[str, ...]] = {
    ".png": ("PNG",),
    ".jpg": ("JPEG",),
    ".jpeg": ("JPEG",),
    ".bmp": ("BMP",),
    ".gif": ("GIF",),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
}

IMAGE_EXTENSIONS = frozenset(FORMATS_OF_EXTENSION)

# Modes whose pixels carry one intensity per pixel (plus, for LA/La, an alpha band).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
# Modes that carry color. "P" is here although a palette may hold only grays: deciding per
# file would let one grayscale GIF change the channel count of a whole dataset.
_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})

_UINT16_MAX = 65535


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def formats_of(name: str) -> tuple[str, ...]:
    """The Pillow formats allowed to decode ``name`` (by its extension); none for others."""
    return FORMATS_OF_EXTENSION.get(os.path.splitext(name)[1].lower(), ())


@contextmanager
def _open_regular(name: str) -> Iterator[BinaryIO]:
    """Open ``name`` for reading only if it is a regular file (after following links).

    A FIFO would block ``open()`` forever and a device never ends; both are bad files. The
    file is opened non-blocking and checked on its descriptor, so a FIFO swapped in after
    the check cannot hang the read either.

    Raises:
        BadFileError: ``not a regular file (...)`` or ``empty file``.
        OSError: as ``os.open`` (mapped to a reason by :func:`_guarded`).
    """
    mode = os.stat(name).st_mode  # a socket cannot even be opened: name it first
    if not stat.S_ISREG(mode):
        raise BadFileError(name, f"not a regular file ({_file_kind(mode)})")
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadFileError(name, f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size == 0:
            raise BadFileError(name, "empty file")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "a device")


def _decoder_open(name: str, fh: BinaryIO) -> Image.Image:
    """``Image.open`` limited to the formats ``name``'s extension claims."""
    formats = formats_of(name)
    if not formats:
        raise BadFileError(name, f"no image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:
        return Image.open(fh, formats=list(formats))
    except UnidentifiedImageError:
        pass
    fh.seek(0)
    try:  # only the formats of the allow-list: none of them runs an external program
        with Image.open(
            fh, formats=sorted({f for fs in FORMATS_OF_EXTENSION.values() for f in fs})
        ) as other:
            actual = other.format
    except UnidentifiedImageError:
        raise BadFileError(name, "not an image") from None
    raise BadFileError(
        name, f"not an image: {actual} data in a file named {os.path.splitext(name)[1]}"
    )


def _pixel_limit_reason() -> str:
    return f"over Pillow's pixel limit of {Image.MAX_IMAGE_PIXELS} pixels (decompression bomb)"


def _os_reason(path: str, exc: OSError) -> str:
    """The short reason for an ``OSError`` raised while opening or reading ``path``."""
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if os.path.islink(path) else "file disappeared while reading"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.strerror:
        return exc.strerror
    message = str(exc)
    if "truncated" in message:
        return "truncated image"
    return f"corrupt image data ({message})" if message else "corrupt image data"


@contextmanager
def _guarded(path: str) -> Iterator[None]:
    """Map every failure of Pillow on one untrusted file to :class:`BadFileError`.

    ``DecompressionBombWarning`` is promoted to an error: a warning scrolls past in a log
    while the stage allocates gigabytes, and a dataset image that large is a mistake anyway.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadFileError(path, _pixel_limit_reason()) from None
    except UnidentifiedImageError:
        raise BadFileError(path, "not an image") from None
    except OSError as exc:
        raise BadFileError(path, _os_reason(path, exc)) from None
    except (SyntaxError, ValueError, EOFError, IndexError) as exc:
        # Pillow's decoders signal malformed data with these too; for an untrusted file
        # they mean "this file is broken", never a bug in the caller.
        raise BadFileError(path, f"corrupt image data ({exc})") from None


def _refuse_truncated_loading() -> None:
    # Another library may have switched this global on; with it, a half-downloaded file
    # decodes to an image padded with gray and nobody notices.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode one image file.

    Decoding happens here, not lazily later, so every error surfaces at this call and
    names the file.

    Args:
        path: The image file.

    Returns:
        The decoded image, in the mode stored in the file; its file handle is closed.

    Raises:
        BadFileError: with reason ``empty file``, ``not a regular file (a FIFO)``,
            ``not a PNG image (as its extension says)``, ``truncated image``,
            ``over Pillow's pixel limit ...``, ``file disappeared while reading``,
            ``symlink loop``, ``broken symlink``, ``corrupt image data (...)`` or the OS error text.
    """
    name = os.fspath(path)
    _refuse_truncated_loading()
    with _guarded(name), _open_regular(name) as fh:
        img = _decoder_open(name, fh)
        img.load()
    return img


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read only the header of an image file: its size and mode.

    Args:
        path: The image file.

    Returns:
        Height, width and Pillow mode. Pixel data is not decoded, so a file with a valid
        header and truncated data passes here and fails in :func:`open_image`.

    Raises:
        BadFileError: as :func:`open_image`, for the errors visible in the header.
    """
    name = os.fspath(path)
    with _guarded(name), _open_regular(name) as fh, _decoder_open(name, fh) as img:
        return ImageInfo(height=img.height, width=img.width, mode=img.mode)


def channels_of(mode: str) -> int:
    """The channel count a Pillow mode normalises to: 1 (grayscale) or 3 (color).

    Alpha does not count: it is composited away by :func:`normalize`. Palette images
    (``P``, ``PA``) count as color, whatever their palette holds.

    Args:
        mode: A Pillow mode such as ``"L"``, ``"I;16"``, ``"RGBA"`` or ``"P"``.

    Raises:
        ValueError: for a mode convpipe does not know how to normalise.
    """
    if mode in _GRAY_MODES or mode.startswith("I;"):
        return 1
    if mode in _COLOR_MODES:
        return 3
    raise ValueError(f"unsupported image mode '{mode}'")


def _round_div(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """``round(numerator / denominator)`` for non-negative integers, halves rounded up."""
    return (2 * numerator + denominator) // (2 * denominator)


def _over_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite ``color`` (H, W[, C]) uint8 over a black background with ``alpha`` (H, W)."""
    weight = alpha.astype(np.uint32)
    if color.ndim == 3:
        weight = weight[:, :, None]
    return _round_div(color.astype(np.uint32) * weight, 255).astype(np.uint8)


def _from_16bit(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255, turning almost every pixel white;
    # rescaling 0..65535 onto 0..255 keeps the picture.
    values = np.clip(np.asarray(img).astype(np.int64), 0, _UINT16_MAX)
    return Image.fromarray(_round_div(values, 257).astype(np.uint8))


def _from_float(img: Image.Image) -> Image.Image:
    # Float images are read on the 0..255 scale of "L", the convention Pillow's own
    # F -> L conversion uses; NaN becomes black rather than an undefined byte.
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _gray_alpha(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    return Image.fromarray(_over_black(values[:, :, 0], values[:, :, 1]))


def _color_alpha(img: Image.Image) -> Image.Image:
    # convert("RGBA") also applies a palette's transparency (the PNG tRNS / GIF index).
    values = np.asarray(img.convert("RGBA"))
    return Image.fromarray(_over_black(values[:, :, :3], values[:, :, 3]))


def _first_bands(count: int) -> Callable[[Image.Image], Image.Image]:
    # Premultiplied modes (La, RGBa) already hold color * alpha: that *is* the color
    # composited over black.
    def take(img: Image.Image) -> Image.Image:
        values = np.ascontiguousarray(np.asarray(img)[:, :, :count])
        return Image.fromarray(values[:, :, 0] if count == 1 else values)

    return take


# Alpha is composited over black because the datasets this pipeline targets (digits, MNIST,
# and scans prepared the same way) draw bright strokes on a black background: a transparent
# pixel is background, and black is what the background means.
_TO_8BIT: dict[str, Callable[[Image.Image], Image.Image]] = {
    "1": lambda img: img.convert("L"),
    "I": _from_16bit,
    "F": _from_float,
    "LA": _gray_alpha,
    "La": _first_bands(1),
    "RGBA": _color_alpha,
    "RGBa": _first_bands(3),
    "P": _color_alpha,
    "PA": _color_alpha,
}


def _to_8bit(img: Image.Image) -> Image.Image:
    """``img`` as an "L" or "RGB" image, alpha composited over black."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode.startswith("I;"):
        return _from_16bit(img)
    convert = _TO_8BIT.get(img.mode)
    if convert is not None:
        return convert(img)
    channels_of(img.mode)  # raises for unknown modes
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported image mode '{img.mode}': {exc}") from None


#: ``data.resize``'s values, from the schema.
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


def fit(img: Image.Image, size_hw: tuple[int, int], resize: str) -> Image.Image:
    """``img`` resized to exactly ``size_hw`` (height, width), bilinear.

    ``stretch``: both sides scaled to the target (the aspect ratio changes); ``crop``: scaled
    until the target fits inside, keeping the aspect, then the centre cut out (torchvision's
    ``Resize`` + ``CenterCrop``); ``pad``: scaled until it fits inside the target, keeping the
    aspect, centred on black.
    """
    height, width = size_hw
    if (img.height, img.width) == (height, width):
        return img
    if resize == "stretch":
        return img.resize((width, height), Image.Resampling.BILINEAR)
    pick = max if resize == "crop" else min
    scale = pick(height / img.height, width / img.width)
    inner = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    scaled = img.resize(inner, Image.Resampling.BILINEAR) if inner != img.size else img
    left, top = (inner[0] - width) // 2, (inner[1] - height) // 2
    if resize == "crop":
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(scaled.mode, (width, height))
    canvas.paste(scaled, (-left, -top))
    return canvas


def normalize(
    img: Image.Image, channels: int, size_hw: tuple[int, int] | None, resize: str = "stretch"
) -> np.ndarray:
    """Convert an image to a uint8 array of the requested channels and size.

    Grayscale becomes color by replicating the gray value; color becomes grayscale by
    Pillow's ``"L"`` conversion (ITU-R 601-2 luma). Alpha is composited over black.
    16-bit and 32-bit integer images are scaled from 0..65535 (``round(v / 257)``); float
    images are read on the 0..255 scale and clipped.

    Args:
        img: A decoded image in any mode accepted by :func:`channels_of`.
        channels: 1 or 3, the channel count of the result.
        size_hw: ``(height, width)`` to resize to, or None to keep the image's size.
            Resizing is bilinear; Pillow widens the filter when shrinking, so downscaling
            is antialiased.
        resize: How the image meets ``size_hw`` (``data.resize``, see :func:`fit`).

    Returns:
        An array of shape ``(H, W, channels)`` and dtype uint8, owning its memory.

    Raises:
        ValueError: for ``channels`` other than 1 or 3, a non-positive size or an
            unsupported mode.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size_hw is not None and min(size_hw) <= 0:
        raise ValueError(f"size_hw must be positive, got {size_hw}")
    base = _to_8bit(img)
    # Drop color before resizing (less work), replicate gray after it (same reason).
    if channels == 1 and base.mode == "RGB":
        base = base.convert("L")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if size_hw is not None:
        base = fit(base, (int(size_hw[0]), int(size_hw[1])), resize)
    values = np.array(base, dtype=np.uint8)
    if values.ndim == 2:
        values = values[:, :, None]
    if channels == 3 and values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return values

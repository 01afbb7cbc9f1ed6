"""The ``csv`` source: one image per row, ``label,p0,p1,...`` (Kaggle MNIST style)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from convpipe.data.raw import ALL, RawDataset
from convpipe.data.readers.base import MODES_BY_CHANNELS, ArrayReader, existing, labelled
from convpipe.errors import ConvpipeError

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
    file = existing(path, "CSV file", want_dir=False)
    shape = tuple(int(d) for d in image_shape)
    if len(shape) == 3 and shape[2] not in MODES_BY_CHANNELS:
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
    return labelled("csv", class_names, {ALL: (indices, reader)})

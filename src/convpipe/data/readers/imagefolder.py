"""The ``imagefolder`` source: one folder of image files per class.

The layout is ``path/<class>/**/<image>``, or ``path/{train,val,test}/<class>/...`` for data
that comes split.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convpipe.data.images import IMAGE_EXTENSIONS, is_image_file
from convpipe.data.raw import ALL, SPLITS, RawDataset
from convpipe.data.readers.base import FileReader, Part, existing, labelled
from convpipe.errors import ConvpipeError

log = logging.getLogger("convpipe")


@dataclass
class _Found:
    """Image files found under one split folder, per class folder name."""

    files: dict[str, list[str]]
    ignored: int
    outside: list[str]


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


def _outside(path: str, top: str) -> bool:
    """Whether ``path``, links resolved, lies outside the real folder ``top``."""
    real = os.path.realpath(path)
    return os.path.commonpath([top, real]) != top


def _walk_images(folder: str, top: str) -> tuple[list[str], int, list[str]]:
    """Image files under ``folder``, other files' count, images linked outside ``top``.

    ``top`` is the real ``data.path``; the file lists are sorted.

    Symlinked folders are followed, but each real folder is visited once and links back to
    ``folder`` or its ancestors are skipped, so symlink loops cannot make discovery hang.
    Links out of ``data.path`` are read too (DVC's symlink cache and shared photo stores
    are made of them) and reported, so a planted link cannot go unnoticed.
    """
    start = os.path.realpath(folder)
    seen = {start}
    pending = [(folder, False)]
    files: list[str] = []
    outside: list[str] = []
    ignored = 0
    while pending:
        current, linked_out = pending.pop()
        for entry in _entries(current):
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real not in seen and os.path.commonpath([start, real]) != real:
                    seen.add(real)
                    out = linked_out or (entry.is_symlink() and _outside(real, top))
                    pending.append((entry.path, out))
            elif is_image_file(entry.name):
                files.append(entry.path)
                if linked_out or (entry.is_symlink() and _outside(entry.path, top)):
                    outside.append(entry.path)
            else:
                ignored += 1
    return sorted(files), ignored, sorted(outside)


def _layout_hint(folder: Path) -> str:
    return f"expected {folder}/<class>/<images> or {folder}/train/<class>/<images>"


def _scan_classes(folder: Path, top: str) -> _Found:
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
    found = _Found(files={}, ignored=len(entries) - len(class_dirs), outside=[])
    for entry in class_dirs:
        if entry.is_symlink() and _outside(entry.path, top):
            found.outside.append(entry.path)
        files, ignored, outside = _walk_images(entry.path, top)
        found.outside += outside
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


def _report_outside(root: Path, outside: list[str]) -> None:
    if outside:
        log.warning(
            "%d image file(s) or class folder(s) in %s are links to outside it (first: %s -> %s);"
            " they are read like the others: remove the links if that is not what you want",
            len(outside),
            root,
            outside[0],
            os.path.realpath(outside[0]),
        )


def open_imagefolder(path: str) -> RawDataset:
    """Images in one folder per class, optionally inside ``train``/``val``/``test`` folders.

    Classes are the sorted union of the class folder names of all splits. Class folders
    are searched recursively (links followed; those leading out of ``path`` are reported
    in one warning line); hidden entries (leading ``.``) and files without an image
    extension are ignored (their count is ``FileReader.ignored``). Files are sorted, so
    the order never depends on the file system.

    Args:
        path: The dataset folder.

    Raises:
        ConvpipeError: missing folder, a file instead of a folder, no class folders, an
            empty class folder, or images mixed with class or split folders.
    """
    root = existing(path, "image folder", want_dir=True)
    top = os.path.realpath(root)
    found = {split: _scan_classes(folder, top) for split, folder in _split_folders(root).items()}
    _report_outside(root, [p for f in found.values() for p in f.outside])
    class_names = sorted(set().union(*(f.files for f in found.values())))
    index = {name: i for i, name in enumerate(class_names)}
    parts: dict[str, Part] = {}
    for split, result in found.items():
        paths = [p for name in sorted(result.files) for p in result.files[name]]
        labels = [index[name] for name in sorted(result.files) for _ in result.files[name]]
        parts[split] = (np.asarray(labels, dtype=np.int64), FileReader(paths, result.ignored))
    return labelled("imagefolder", class_names, parts)

"""Atomic file output: every file a stage writes appears complete or not at all.

Writers create a temporary sibling, fill it, ``fsync`` it and ``os.replace`` it over the
target, so DVC can never cache a truncated output of a failed or killed stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

# Temporary names carry the writer's host and pid, so a later run can tell the leftovers of
# a killed writer (swept) from those of one still running (kept): .<name>.<host>-<pid>.<random>.tmp
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_STALE = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.(?:[^.]+\.tmp|old)$")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary siblings of ``target`` that killed writers left behind.

    Only convpipe's own temporary names for ``target`` (:func:`atomic_path`,
    :func:`atomic_dir`) made on this host by a process that no longer runs are removed;
    nothing else is touched. A killed prepare can leave a preallocated folder of many GB.

    Returns:
        The paths removed.
    """
    target = Path(target)
    removed: list[Path] = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _STALE.match(path.name)
        if not match or match["name"] != target.name or match["host"] != _HOST:
            continue
        if _alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success rename it to ``target``.

    On an exception the temporary file is removed and ``target`` is left as it was; a
    temporary file a killed writer left is removed by the next write (:func:`sweep_stale`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f"{_temp_prefix(target)}old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say).

    Readers and model builders bound what untrusted sizes (a file header, a checkpoint's
    hyperparameters) may make them allocate by it.
    """
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def create_npy(path: str | os.PathLike[str], dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A writable ``.npy`` memmap of ``shape`` whose disk space is reserved up front.

    Pages of a plain memmap get their blocks when first written, and a full disk then kills
    the process with SIGBUS; reserving them now turns that into an ``ENOSPC`` here.

    Raises:
        OSError: ``ENOSPC`` (with ``path`` as its filename) if the disk cannot hold the file.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "rb+") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        del array
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    return array


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_npy(target: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (readable later with ``mmap_mode='r'``)."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while inside.

    Where ``fcntl`` is missing (not POSIX), or the file cannot be opened (another user's),
    it goes on unserialised: callers keep their writes atomic anyway.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(path, "a+")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def content_hash(paths: Iterable[Path]) -> str:
    """``sha256:<hex>`` of the files' bytes in the given order: a folder's data identity."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return "sha256:" + digest.hexdigest()

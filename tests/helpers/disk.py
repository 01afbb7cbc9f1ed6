"""A small real disk for full-disk tests: a tmpfs mounted (as root) where a test wants it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS_MB = 64


@contextlib.contextmanager
def small_disk(where: Path, megabytes: int = TMPFS_MB) -> Iterator[Path]:
    """A ``megabytes`` tmpfs mounted at ``where`` (skips where mounting needs root)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take the disk's free space down to ``leave`` bytes (a ``filler`` file takes the rest)."""
    stat = os.statvfs(disk)
    remaining = max(stat.f_bavail * stat.f_frsize - leave, 0)
    chunk = b"\0" * (1 << 20)
    with open(disk / "filler", "wb") as fh:
        while remaining > 0:
            remaining -= fh.write(chunk[: min(len(chunk), remaining)])

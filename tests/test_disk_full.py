"""A full disk (ENOSPC) while prepare or augment writes: one line, the previous outputs intact.

The stages run as real processes in a folder whose ``data/`` is a small tmpfs: a first run
fills it with good outputs, a filler file then takes all but a fraction of what a rerun needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from convpipe.errors import EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parents[1]
TMPFS_MB = 64


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def stage(cwd: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / f"{name}.py")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fill(disk: Path, leave: int) -> None:
    """Take the disk's free space down to ``leave`` bytes."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = max(free - leave, 0)
        while remaining > 0:
            remaining -= fh.write(chunk[: min(len(chunk), remaining)])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prepare", "augment"])
def test_disk_full_is_one_line_and_keeps_the_previous_outputs(tmp_path: Path, name: str) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with small_disk(tmp_path / "data") as disk:
        for needed in ("prepare", name):
            done = stage(tmp_path, needed)
            assert done.returncode == 0, done.stderr
        out = disk / ("prepared" if name == "prepare" else "augmented")
        before = snapshot(disk)
        size = sum((p.stat().st_size for p in out.rglob("*") if p.is_file()), 0)
        fill(disk, leave=size // 4)
        before["filler"] = snapshot(disk)["filler"]

        failed = stage(tmp_path, name)

        assert failed.returncode == EXIT_USER_ERROR, failed.stderr
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert "Traceback" not in failed.stderr
        assert lines[-1].startswith("convpipe: error: the disk is full (No space left on device)")
        assert "free space there and rerun" in lines[-1]
        assert [line for line in lines if line.startswith("convpipe: error:")] == [lines[-1]]
        assert snapshot(disk) == before  # same files, same bytes: no temp leftovers either
        (disk / "filler").unlink()
        assert stage(tmp_path, name).returncode == 0  # space freed: the rerun works

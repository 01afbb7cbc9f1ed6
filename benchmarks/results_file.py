"""The GPU check's section of ``benchmarks/RESULTS.md``, kept apart from ``make bench``'s.

``make gpu-check`` runs where a GPU is lent (rarely); ``make bench`` rewrites RESULTS.md on the
CPU machine. The GPU table lives between two markers: the check replaces only that block, and
a new ``make bench`` report carries the block over, so neither erases the other's figures.
Standard library only: the GPU machines bring few packages.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BEGIN = "<!-- gpu-check: begin (written by make gpu-check; make bench keeps it) -->"
END = "<!-- gpu-check: end -->"


def gpu_block(path: Path) -> str | None:
    """The marked GPU block of ``path`` (markers included), or None if it has none."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(END)]


def with_gpu_block(text: str, block: str | None) -> str:
    """``text`` with its marked GPU block replaced by ``block`` (appended if it has none)."""
    if block is None:
        return text
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        return text[:start] + block + text[end + len(END) :]
    return text.rstrip() + "\n\n" + block + "\n"


def put_gpu_section(path: Path, body: str) -> None:
    """Write ``body`` as the GPU block of ``path``, atomically (temp file, then rename)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    text = with_gpu_block(old, f"{BEGIN}\n{body.strip()}\n{END}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

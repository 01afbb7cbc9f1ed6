"""Sections of ``benchmarks/RESULTS.md`` kept apart from ``make bench``'s.

``make gpu-check`` runs where a GPU is lent (rarely), ``make bench-streaming`` (a 200,000-image
set, too long for ``make bench``'s budget) on its own; ``make bench`` rewrites RESULTS.md on the
CPU machine. Each of those tables lives between two markers: its command replaces only that
block, and a new ``make bench`` report carries the blocks over, so none erases another's figures.
Standard library only: the GPU machines bring few packages.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Sections of RESULTS.md that a command of their own writes and ``make bench`` carries over:
#: marker name -> the command that writes it.
KEPT = {"gpu-check": "make gpu-check", "bench-streaming": "make bench-streaming"}


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of kept section ``name``."""
    return f"<!-- {name}: begin (written by {KEPT[name]}; make bench keeps it) -->", (
        f"<!-- {name}: end -->"
    )


def kept_block(path: Path, name: str) -> str | None:
    """The marked block ``name`` of ``path`` (markers included), or None if it has none."""
    if not path.is_file():
        return None
    begin, end_marker = markers(name)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[start : end + len(end_marker)]


def with_block(text: str, name: str, block: str | None) -> str:
    """``text`` with its marked block ``name`` replaced by ``block`` (appended if it has none)."""
    if block is None:
        return text
    begin, end_marker = markers(name)
    start, end = text.find(begin), text.find(end_marker)
    if start >= 0 and end > start:
        return text[:start] + block + text[end + len(end_marker) :]
    return text.rstrip() + "\n\n" + block + "\n"


def with_kept_blocks(text: str, path: Path) -> str:
    """``text`` (a new report) with every kept block of ``path`` carried over."""
    for name in KEPT:
        text = with_block(text, name, kept_block(path, name))
    return text


def put_section(path: Path, name: str, body: str) -> None:
    """Write ``body`` as kept block ``name`` of ``path``, atomically (temp file, then rename)."""
    begin, end = markers(name)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    text = with_block(old, name, f"{begin}\n{body.strip()}\n{end}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

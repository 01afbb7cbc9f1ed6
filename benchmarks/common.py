"""What every benchmark shares: timing statistics, the machine description, result sections.

Each ``bench_*.py`` exposes ``run(quick: bool = False) -> list[Section]`` and, run as a script,
prints its sections. ``benchmarks/run_all.py`` (``make bench``) runs them in one process tree,
one after the other, and writes ``benchmarks/RESULTS.md``. ``quick`` shrinks sizes and repeats
so a benchmark can be smoke-tested in seconds; the committed results never come from it.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


@dataclass
class Section:
    """One measurement of RESULTS.md.

    Attributes:
        title: Heading, e.g. "Loop overhead".
        goal: The target in words, e.g. "throughput ratio >= 0.95".
        met: True / False against the goal; None when skipped (say why in ``body``).
        summary: One line: the headline figure with median and spread.
        body: Markdown below the summary: tables, what was tried, by how much a goal is missed.
    """

    title: str
    goal: str
    met: bool | None
    summary: str
    body: str = ""

    def markdown(self) -> str:
        """The section as Markdown (a level-2 heading and its text)."""
        verdict = {True: "met", False: "missed", None: "skipped"}[self.met]
        text = f"## {self.title}\n\n**Goal:** {self.goal} — **{verdict}**\n\n{self.summary}\n"
        return text + (f"\n{self.body.strip()}\n" if self.body.strip() else "")


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """Median and spread (max - min) of repeated measurements."""
    if not values:
        raise ValueError("no measurements")
    return statistics.median(values), max(values) - min(values)


def fmt(values: Sequence[float], digits: int = 3, unit: str = "") -> str:
    """``median ± half-spread unit (n=...)``: the form every figure in RESULTS.md takes."""
    med, spread = median_spread(values)
    return f"{med:.{digits}f} ± {spread / 2:.{digits}f}{unit} (n={len(values)})"


def machine_info() -> dict[str, str]:
    """CPU, cores, memory, OS and the versions that decide the figures."""
    import lightning
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        mem = f"{kib / 2**20:.1f} GiB"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": mem,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
    }


def print_sections(sections: Sequence[Section]) -> None:
    """Print sections as Markdown (what a standalone ``bench_*.py`` run shows)."""
    for section in sections:
        print(section.markdown())

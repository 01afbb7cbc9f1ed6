"""What every benchmark shares: timing statistics, the machine description, result sections.

Each ``bench_*.py`` exposes ``run(quick: bool = False) -> list[Section]`` and, run as a script,
prints its sections. ``benchmarks/run_all.py`` (``make bench``) runs them in one process tree,
one after the other, and writes ``benchmarks/RESULTS.md``. ``quick`` shrinks sizes and repeats
so a benchmark can be smoke-tested in seconds; the committed results never come from it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class Checkout:
    """A throwaway copy of this checkout in its own git repo: what a fresh clone holds.

    Benchmarks that time the real CLIs (``dvc repro``, ``convpipe tune``) run them here, with
    this venv's executables and the copy's sources first on the path.
    """

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_this_one(cls, dest: Path) -> Checkout:
        """Copy every tracked or new, not ignored, file of the project into ``dest``."""
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        for name in filter(None, listed.split("\0")):
            if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(dest / "src"))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("MLFLOW_TRACKING_URI", None)  # the copy tracks into its own mlflow.db
        checkout = cls(dest, env)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"]):
            checkout.run(*cmd)
        checkout.run(
            "git",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "commit",
            "-q",
            "-m",
            "benchmark copy",
        )
        return checkout

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the copy; raise with its output if it fails."""
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done

    def set_params(self, **values: object) -> None:
        """Set dotted params keys as ``dvc exp run -S`` does (DVC's own writer)."""
        from dvc.utils.hydra import apply_overrides

        apply_overrides(self.root / "params.yaml", [f"{k}={v}" for k, v in values.items()])


# Matrix sizes a dense peak is measured at: large enough for the kernels' full speed.
PEAK_SIZES = (2048, 4096)


def dense_peak(threads: int, precision: str, repeats: int = 3) -> float:
    """The best FLOP/s of large matrix products at the precision a training runs in.

    ``bf16-mixed`` runs its convolutions and products in bfloat16 (AMX or AVX-512 BF16 where
    the CPU has them), so its peak is the best bf16 product; any other precision is compared
    with fp32. The best of several sizes and repeats, never a median: a run that is not at
    the kernel's best is not its peak, and a fraction of a too-low peak would pass 100 %.
    """
    import torch

    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for size in PEAK_SIZES:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            torch.mm(a, b)  # the first call allocates and picks its kernel
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * size**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return best


# ------------------------------------------------- runs kept in a JSON-lines log, and reports

#: Two-sided 95 % t quantiles by sample size (n - 1 degrees of freedom); 2.5 past 5.
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95 % t interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95.get(len(values), 2.5) * statistics.stdev(values) / math.sqrt(len(values))


def read_records(log: Path) -> list[dict]:
    """The runs a benchmark appended to ``log`` (none if it does not exist yet)."""
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def append_record(log: Path, record: dict[str, object]) -> None:
    """Add one finished run to ``log`` (a rerun goes on from there) and print it."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def write_results(
    sections: Sequence[Section], log: Path, output: Path | None, bench: str, quick: bool
) -> None:
    """Print ``sections``, or write them as a results file (run_all's form) for ``log``'s runs."""
    if output is None:
        print_sections(sections)
        return
    from run_all import Timed, render

    from convpipe.io import write_text

    spent = sum(float(r.get("seconds", 0.0)) for r in read_records(log))
    command = f"python benchmarks/{bench}.py --log {log.name}, then --report --output"
    write_text(output, render([Timed(bench, spent, sections)], command, spent, quick))

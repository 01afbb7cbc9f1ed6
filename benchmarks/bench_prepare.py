"""Prepare-stage throughput (images/s) and peak RSS on real MNIST and on PNG folders.

Runs the real ``pipelines/prepare.py`` in a subprocess per measurement, so peak RSS is that
process's own (``VmHWM`` from Linux's ``/proc``, interpreter and imports included) and the wall
time is what a ``dvc repro prepare`` of the stage costs. Cases:

* MNIST IDX (``../shared/datasets/mnist``, 70k gzipped images; skipped with a message when
  absent);
* a generated folder of 28x28 grayscale PNGs in 10 class folders (sklearn digits, upscaled):
  60,000 images, and a tenth of that to show that memory does not grow with the dataset;
* optionally (``--jpg N``, standalone only) N 32x32 RGB JPEGs, CIFAR-sized.

Goal: bounded memory (peak RSS < 1 GiB) and > 2,000 images/s on small PNGs.

Usage: python benchmarks/bench_prepare.py [--quick] [--jpg N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MNIST, ROOT, Section, fmt, median_spread, print_sections

GOAL_RATE = 2000.0  # images/s on small PNGs
GOAL_RSS = 1024.0  # MiB
PNG_IMAGES = 60_000
QUICK_PNG_IMAGES = 2_000


@dataclass
class Case:
    """Repeated prepare runs of one dataset."""

    name: str
    images: int
    rates: list[float]
    rss: list[float]

    def row(self) -> str:
        """One Markdown table row: case, images, images/s, peak RSS."""
        return f"| {self.name} | {self.images:,} | {fmt(self.rates, 0)} | {fmt(self.rss, 0)} |"


# Prints the stage's own peak RSS in MiB (VmHWM belongs to this process's memory map, which
# exec starts afresh; ru_maxrss would not do: Linux carries it over exec from the forking
# parent, so under run_all, a parent of ~800 MiB, every case would report the parent's size),
# then the peak anonymous memory of the stage and its decode workers together (prepare forks
# one per core from 4,096 images): the sum of their Pss_Anon, sampled every 50 ms. VmHWM
# counts the pages of files a process maps (npy's memory-mapped output: they grow with the
# dataset) and none of its workers'.
_CHILD = """
import os, runpy, sys, threading, time
def pss_anon(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss_Anon:"))
    except (OSError, StopIteration):
        return 0
def children():
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                pids += fh.read().split()
        except OSError:
            pass
    return pids
peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], sum(pss_anon(pid) for pid in ["self", *children()]))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
script, params = sys.argv[1], sys.argv[2]
sys.argv = [script, "--params", params]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) / 1024, max(peak[0], pss_anon("self")) / 1024)
"""


def run_prepare(params: dict[str, Any], workdir: Path) -> tuple[float, float, float]:
    """Run the prepare stage once: seconds, its peak RSS, peak anonymous MiB with workers."""
    params_file = workdir / "params.yaml"
    YAML().dump(params, params_file)
    cmd = [sys.executable, "-c", _CHILD, str(ROOT / "pipelines" / "prepare.py"), str(params_file)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{proc.stderr[-4000:]}")
    peak, anon = proc.stdout.strip().splitlines()[-1].split()
    return elapsed, float(peak), float(anon)


def base_params() -> dict[str, Any]:
    """The shipped params.yaml as a dict."""
    params: dict[str, Any] = YAML(typ="safe").load(ROOT / "params.yaml")
    return params


def measure(name: str, data: dict[str, Any], images: int, repeats: int) -> Case:
    """Run prepare ``repeats`` times on ``data`` (the ``data:`` keys to change)."""
    case = Case(name, images, [], [])
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="convpipe-bench-prepare-") as tmp:
            params = base_params()
            params["data"].update(data)
            params["paths"]["prepared"] = str(Path(tmp) / "prepared")
            seconds, peak, anon = run_prepare(params, Path(tmp))
        case.rates.append(images / seconds)
        case.rss.append(peak)
        print(
            f"  {name}: {images / seconds:,.0f} images/s, {peak:,.0f} MiB "
            f"({anon:,.0f} MiB anonymous with its decode workers)",
            flush=True,
        )
    return case


def write_image_folder(
    root: Path, count: int, fmt: str = "png", size: int = 28, rgb: bool = False
) -> None:
    """Write ``count`` images in 10 class folders (sklearn digits, upscaled; RGB like CIFAR).

    Each of the 1,797 digits is encoded once; the files cycle through them.
    """
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    encoded = []
    for image in digits.images:
        tile = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((size, size))
        buffer = io.BytesIO()
        (tile.convert("RGB") if rgb else tile).save(buffer, format="JPEG" if fmt == "jpg" else fmt)
        encoded.append(buffer.getvalue())
    for cls in range(10):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        j = i % len(encoded)
        (root / str(digits.target[j]) / f"{i:06d}.{fmt}").write_bytes(encoded[j])


def folder_case(name: str, count: int, repeats: int, **image: Any) -> Case:
    """Generate an image folder (not timed), then time prepare on it."""
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-images-") as tmp:
        start = time.perf_counter()
        write_image_folder(Path(tmp) / "images", count, **image)
        print(f"  wrote {count:,} images in {time.perf_counter() - start:.1f} s", flush=True)
        data = {"source": "imagefolder", "path": str(Path(tmp) / "images")}
        return measure(name, data, count, repeats)


def measure_all(quick: bool, jpg: int = 0) -> tuple[list[Case], str]:
    """Every case; the message saying MNIST was skipped, if it was."""
    repeats = 1 if quick else 3
    cases = []
    skipped = ""
    if MNIST.is_dir():
        data = {"source": "mnist_idx", "path": str(MNIST)}
        cases.append(measure("MNIST IDX (gzip)", data, 70_000, repeats))
    else:
        skipped = f"MNIST IDX skipped: {MNIST} not found."
        print(f"  {skipped}", flush=True)
    png = QUICK_PNG_IMAGES if quick else PNG_IMAGES
    if not quick:
        cases.append(folder_case("28x28 PNG folder", png // 10, repeats))
    cases.append(folder_case("28x28 PNG folder", png, repeats))
    if jpg:
        cases.append(
            folder_case("32x32 RGB JPEG folder", jpg, repeats, fmt="jpg", size=32, rgb=True)
        )
    return cases, skipped


def run(quick: bool = False, jpg: int = 0) -> list[Section]:
    """Measure every case; one section judged on the largest PNG folder and all peaks."""
    cases, skipped = measure_all(quick, jpg)
    png = [c for c in cases if "PNG" in c.name][-1]
    peak = max(max(c.rss) for c in cases)
    png_rate, _ = median_spread(png.rates)
    met = png_rate > GOAL_RATE and peak < GOAL_RSS
    rows = [
        "| case | images | images/s | peak RSS (MiB) |",
        "|---|---|---|---|",
        *(case.row() for case in cases),
    ]
    notes = [
        f"- Each run is a fresh `pipelines/prepare.py` process on the shipped params.yaml "
        f"(`data.chunk_size` images decoded at a time), {len(png.rates)} run(s) per case; peak "
        "RSS includes the interpreter and its imports.",
    ]
    folders = [c for c in cases if "PNG" in c.name]
    if len(folders) == 2:
        small, large = folders
        growth = statistics.median(large.rss) - statistics.median(small.rss)
        notes.append(
            f"- Bounded memory: {large.images // small.images}x the PNGs ({small.images:,} → "
            f"{large.images:,}) raise the peak by {growth:,.0f} MiB; images are decoded "
            "`data.chunk_size` at a time and written to memory-mapped arrays."
        )
    if skipped:
        notes.append(f"- {skipped}")
    misses = []
    if png_rate <= GOAL_RATE:
        misses.append(
            f"PNG throughput {png_rate:,.0f} images/s is {GOAL_RATE - png_rate:,.0f} short"
        )
    if peak >= GOAL_RSS:
        misses.append(f"peak RSS {peak:,.0f} MiB is {peak - GOAL_RSS:,.0f} MiB over")
    if misses:
        notes.append(f"- Goal missed: {'; '.join(misses)}.")
    summary = (
        f"{png.images:,} PNGs: {fmt(png.rates, 0, ' images/s')}; "
        f"highest peak RSS over all cases {peak:,.0f} MiB."
    )
    return [
        Section(
            title="Prepare",
            goal=(
                f"peak RSS < {GOAL_RSS / 1024:.0f} GiB and > {GOAL_RATE:,.0f} images/s "
                "on small PNGs"
            ),
            met=met,
            summary=summary,
            body="\n".join([*rows, "", *notes]),
        )
    ]


def main() -> None:
    """Print the section."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one run per case, 2,000 PNGs")
    parser.add_argument("--jpg", type=int, default=0, help="also time N 32x32 RGB JPEGs")
    args = parser.parse_args()
    print_sections(run(quick=args.quick, jpg=args.jpg))


if __name__ == "__main__":
    main()

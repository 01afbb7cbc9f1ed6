"""Prepare-stage throughput (images/s) and peak RSS on real MNIST and on a PNG folder.

Runs the real ``pipelines/prepare.py`` in a subprocess per measurement (so peak RSS is that
process's own) and prints one line per case. MNIST comes from ``../shared/datasets/mnist``;
the case is skipped with a message when it is absent.

Usage: python benchmarks/bench_prepare.py [--repeats 3] [--png 60000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def run_prepare(params: dict, workdir: Path) -> tuple[float, float]:
    """Run prepare once; return (seconds, peak RSS in MiB) of the child process."""
    params_file = workdir / "params.yaml"
    YAML().dump(params, params_file)
    cmd = [sys.executable, "-c", _CHILD, str(ROOT / "pipelines" / "prepare.py"), str(params_file)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr}")
    return elapsed, float(proc.stdout.strip().splitlines()[-1])


# Measures the stage's own peak RSS (ru_maxrss of this child, in KiB on Linux).
_CHILD = """
import resource, runpy, sys
script, params = sys.argv[1], sys.argv[2]
sys.argv = [script, "--params", params]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def base_params() -> dict:
    """The shipped params.yaml as a dict."""
    return YAML(typ="safe").load(ROOT / "params.yaml")


def measure(name: str, params: dict, images: int, repeats: int) -> None:
    """Print median and spread of images/s and peak RSS over ``repeats`` runs."""
    rates, rss = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            params["paths"]["prepared"] = str(Path(tmp) / "prepared")
            seconds, peak = run_prepare(params, Path(tmp))
            rates.append(images / seconds)
            rss.append(peak)
    print(
        f"{name}: {statistics.median(rates):,.0f} images/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}); "
        f"peak RSS {statistics.median(rss):,.0f} MiB (max {max(rss):,.0f}); "
        f"{images} images, {repeats} runs",
        flush=True,
    )


def write_image_folder(
    root: Path, count: int, fmt: str = "png", size: int = 28, rgb: bool = False
) -> None:
    """Write ``count`` images in 10 class folders (sklearn digits, upscaled; RGB like CIFAR)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for cls in range(10):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        j = i % len(digits.images)
        img = Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8)).resize((size, size))
        if rgb:
            img = img.convert("RGB")
        img.save(root / str(digits.target[j]) / f"{i:06d}.{fmt}")


def main() -> None:
    """Run the prepare benchmarks and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", type=int, default=0, help="also time a PNG folder of N images")
    parser.add_argument(
        "--jpg", type=int, default=0, help="also time N 32x32 RGB JPEGs (CIFAR-sized)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if MNIST.is_dir():
        params = base_params()
        params["data"].update(source="mnist_idx", path=str(MNIST))
        measure("prepare mnist_idx (70k, gz)", params, 70000, args.repeats)
    else:
        print(f"prepare mnist_idx: skipped, {MNIST} not found")
    if args.png:
        with tempfile.TemporaryDirectory() as tmp:
            write_image_folder(Path(tmp) / "png", args.png)
            params = base_params()
            params["data"].update(source="imagefolder", path=str(Path(tmp) / "png"))
            measure(f"prepare imagefolder ({args.png} 28x28 PNG)", params, args.png, args.repeats)
    if args.jpg:
        with tempfile.TemporaryDirectory() as tmp:
            write_image_folder(Path(tmp) / "jpg", args.jpg, fmt="jpg", size=32, rgb=True)
            params = base_params()
            params["data"].update(source="imagefolder", path=str(Path(tmp) / "jpg"))
            measure(
                f"prepare imagefolder ({args.jpg} 32x32 RGB JPEG)", params, args.jpg, args.repeats
            )


if __name__ == "__main__":
    main()

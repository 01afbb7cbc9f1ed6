"""``make gpu-bundle``: the wheels ``make gpu-check`` needs on a GPU machine without a registry.

The GPU machines this project can borrow bring their own Python (3.12), CUDA build of torch,
Lightning, torchmetrics, numpy and OpenCV, and reach no package registry. This downloads, on
the CPU machine, the locked versions (``requirements.lock``) of everything else the check
imports (:data:`gpu_check.BUNDLED`), as CPython 3.12 manylinux wheels without dependencies,
into ``build/gpu-bundle``, and refuses a bundle of :data:`MAX_BYTES` or more (the device
tool carries at most 64 MiB). ``gpu_check.py`` installs from it only what the GPU machine
lacks.

Usage: python benchmarks/gpu_bundle.py [--python-version 3.12] [--dest build/gpu-bundle]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gpu_check import BUNDLE, BUNDLED, ROOT

LOCK = ROOT / "requirements.lock"
#: The device tool carries 64 MiB in all, the working tree included (~3 MiB).
MAX_BYTES = 56 * 2**20
#: manylinux tags a current GPU machine's pip accepts, newest first.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalise(name: str) -> str:
    """A distribution name as wheel files and the lock spell it, compared loosely."""
    return re.sub(r"[-_.]+", "_", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of the lock."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def requirements(pins: dict[str, str]) -> list[str]:
    """``name==version`` of every bundled distribution, from the lock.

    Raises:
        SystemExit: naming a bundled distribution the lock does not pin.
    """
    names = sorted({dist for dists in BUNDLED.values() for dist in dists})
    missing = [name for name in names if normalise(name) not in pins]
    if missing:
        raise SystemExit(f"gpu-bundle: error: {', '.join(missing)} not pinned in {LOCK}")
    return [f"{name}=={pins[normalise(name)]}" for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dest", type=Path, default=BUNDLE)
    args = parser.parse_args(argv)
    wanted = requirements(locked_versions(LOCK))
    partial = args.dest.with_name(args.dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--implementation", "cp"]
    command += ["--python-version", args.python_version, *platforms, "--dest", str(partial)]
    done = subprocess.run([*command, *wanted], check=False)
    if done.returncode != 0:
        print("gpu-bundle: error: pip download failed (see above)", file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path in partial.glob("*.whl"))
    if size >= MAX_BYTES:
        print(
            f"gpu-bundle: error: the bundle is {size / 2**20:.1f} MiB, over "
            f"{MAX_BYTES / 2**20:.0f} MiB: drop a package from gpu_check.BUNDLED",
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(args.dest, ignore_errors=True)
    partial.rename(args.dest)
    count = len(list(args.dest.glob("*.whl")))
    print(f"gpu-bundle: {count} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

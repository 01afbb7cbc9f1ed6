"""``make bench``: run every benchmark in one go and write ``benchmarks/RESULTS.md``.

Imports the benchmark modules by name, in this order, and calls each one's
``run(quick) -> list[Section]``, timing it:

    bench_loop, bench_flops, bench_mnist, bench_augment, bench_prepare

A module that is missing stops the run before anything is measured (it is never silently
skipped). RESULTS.md gets a header (date, machine and versions, the command, total wall time),
a summary table (measurement | goal | result | verdict), each module's run time, then every
section in full; it is written atomically once everything has run, so a failed or interrupted
run leaves the previous file as it was (and prints the sections it did measure to stderr).

``--quick`` is a smoke run (tiny sizes, figures meaningless) and ``--only`` runs some modules:
both print to stdout, or write to ``--output``, and never to RESULTS.md.

``benchmarks/bench_cifar.py`` (the CIFAR-10 recipes trained for real, 15-40 min) runs with
``--only bench_cifar`` (``make bench-cifar``, into ``benchmarks/RESULTS_CIFAR.md``), and
``benchmarks/bench_photos.py`` (few photos a class and fine-tuning, ~1 h) with ``--only
bench_photos`` (``make bench-photos``, into ``benchmarks/RESULTS_PHOTOS.md``), and
``benchmarks/bench_samplers.py`` (the six Optuna samplers, 3 seeds of 20 trials, and an
accuracy/latency front, ~30 min) with ``--only bench_samplers`` (``make bench-samplers``, into
``benchmarks/RESULTS_SAMPLERS.md``).
``benchmarks/bench_streaming.py`` (data.format litdata against npy on 200,000 images, ~10 min)
writes its own block of RESULTS.md (``make bench-streaming``); a full run here keeps it, as it
keeps ``make gpu-check``'s.
``benchmarks/bench_tuning.py`` (pruned vs unpruned: two 12-trial campaigns of real
``convpipe tune``, up to 15 epochs a trial) stays a standalone script: the five benchmarks above
already take ~25 of the 30 minutes ``make bench`` may take.

Usage: python benchmarks/run_all.py [--quick] [--only NAME ...] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Section, machine_info  # noqa: E402
from results_file import with_kept_blocks  # noqa: E402

from convpipe.io import write_text  # noqa: E402

MODULES = ("bench_loop", "bench_flops", "bench_mnist", "bench_augment", "bench_prepare")
# Too long for make bench's budget: run with --only (make bench-cifar).
STANDALONE = ("bench_cifar", "bench_photos", "bench_samplers")
RESULTS = HERE / "RESULTS.md"
VERDICT = {True: "met", False: "missed", None: "skipped"}


class BenchError(Exception):
    """A benchmark module is missing or does not follow the interface."""


@dataclass
class Timed:
    """One module's sections and how long its ``run()`` took."""

    module: str
    seconds: float
    sections: list[Section]


def load(names: Sequence[str]) -> list[ModuleType]:
    """Import every module before running any, so a missing one fails at once.

    Raises:
        BenchError: If a module is not found or has no ``run`` function.
    """
    modules = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module exists but one of its imports is missing: show that
            raise BenchError(
                f"benchmark module {name} not found (expected {HERE / name}.py)"
            ) from None
        if not callable(getattr(module, "run", None)):
            raise BenchError(f"{name} has no run(quick) function")
        modules.append(module)
    return modules


def run_module(module: ModuleType, quick: bool) -> Timed:
    """Call ``module.run(quick=quick)``, time it and check what it returned.

    Raises:
        BenchError: If it returned no sections or something other than Sections.
    """
    name = module.__name__
    print(f"== {name} ==", flush=True)
    start = time.perf_counter()
    sections = list(module.run(quick=quick))
    seconds = time.perf_counter() - start
    # duck-typed: a module run as __main__ elsewhere may hold another copy of common.Section
    fields = ("title", "goal", "met", "summary", "markdown")
    if not sections or not all(all(hasattr(s, f) for f in fields) for s in sections):
        raise BenchError(f"{name}.run() must return a non-empty list of Sections")
    print(f"== {name}: {seconds:.0f} s ==", flush=True)
    return Timed(name, seconds, sections)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no bare pipes)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render(timed: Sequence[Timed], command: str, total: float, quick: bool) -> str:
    """The whole RESULTS.md text."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmark results", ""]
    if quick:
        lines += ["**Quick smoke run: tiny sizes, the figures mean nothing.**", ""]
    lines += [
        f"Run on {now} with `{command}`; total wall time {total / 60:.1f} min. Figures are "
        "median ± half the spread (max − min) over n repeated runs.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {_cell(value)} |" for key, value in machine_info().items()),
        "",
        "## Summary",
        "",
        "| measurement | goal | result | verdict |",
        "|---|---|---|---|",
    ]
    for section in (s for t in timed for s in t.sections):
        verdict = VERDICT[section.met]
        lines.append(
            f"| {_cell(section.title)} | {_cell(section.goal)} | {_cell(section.summary)} "
            f"| {verdict} |"
        )
    lines += ["", "| benchmark | run time |", "|---|---|"]
    lines += [f"| {t.module} | {t.seconds / 60:.1f} min |" for t in timed]
    lines.append("")
    for section in (s for t in timed for s in t.sections):
        lines.append(section.markdown())
    return "\n".join(lines).rstrip() + "\n"


def _output(args: argparse.Namespace) -> Path | None:
    """Where to write: RESULTS.md, ``--output``, or None for stdout.

    Only a full run (not ``--quick``, no ``--only``) writes RESULTS.md: it must show every
    measurement from one run. Partial and quick runs print unless given ``--output``.

    Raises:
        BenchError: If a quick or partial run would overwrite RESULTS.md.
    """
    full = not args.quick and not args.only
    if args.output is None:
        return RESULTS if full else None
    target = Path(args.output)
    if not full and target.resolve() == RESULTS.resolve():
        raise BenchError(f"only a full run writes {RESULTS}; pick another --output")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and write the results; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; stdout unless --output")
    parser.add_argument(
        "--output", help=f"file to write (default: {RESULTS.name} for a full run, else stdout)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these modules")
    args = parser.parse_args(argv)
    names = list(MODULES)
    try:
        if args.only:
            known = (*MODULES, *STANDALONE)
            unknown = sorted(set(args.only) - set(known))
            if unknown:
                raise BenchError(f"unknown benchmark {', '.join(unknown)}")
            names = [n for n in known if n in args.only]
        target = _output(args)
        modules = load(names)
    except BenchError as exc:
        print(f"run_all: error: {exc}", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/run_all.py", *given])
    start = time.perf_counter()
    timed: list[Timed] = []
    try:
        for module in modules:
            timed.append(run_module(module, args.quick))
    except BaseException:
        # nothing is written, but the sections measured so far are not lost either
        for section in (s for t in timed for s in t.sections):
            print(section.markdown(), file=sys.stderr)
        raise
    text = render(timed, command, time.perf_counter() - start, args.quick)
    if target is not None and target.resolve() == RESULTS.resolve():
        text = with_kept_blocks(text, RESULTS)  # make gpu-check's, bench-streaming's figures stay
    if target is None:
        print(text)
    else:
        write_text(target, text)
        print(f"wrote {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

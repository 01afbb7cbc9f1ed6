"""The benchmark runner: a real quick benchmark, assembled into a results file by run_all.

Speed targets are never asserted here: the figures depend on the machine and its load. What
is checked is that the runner runs real benchmarks, reports them in full and never writes
RESULTS.md from a quick or partial run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.helpers.project import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all
from common import MNIST


def _state(path: Path) -> tuple[bool, int, bytes]:
    """Whether ``path`` exists, its mtime and its bytes (to prove nothing touched it)."""
    if not path.exists():
        return False, 0, b""
    return True, path.stat().st_mtime_ns, path.read_bytes()


def _figure(cell: str) -> float:
    """The median of a ``median ± half-spread (n=...)`` table cell."""
    found = re.match(r"\s*([\d,.]+) ± [\d,.]+.* \(n=\d+\)", cell)
    assert found, cell
    return float(found.group(1).replace(",", ""))


@pytest.mark.subprocess
def test_quick_prepare_run_is_assembled_into_a_full_report(tmp_path: Path) -> None:
    before = _state(run_all.RESULTS)
    out = tmp_path / "quick.md"
    assert run_all.main(["--quick", "--only", "bench_prepare", "--output", str(out)]) == 0
    assert _state(run_all.RESULTS) == before
    text = out.read_text(encoding="utf-8")

    assert text.startswith("# Benchmark results\n")
    assert "Quick smoke run" in text
    assert "`python benchmarks/run_all.py --quick --only bench_prepare --output" in text
    for key in ("cpu", "cores", "torch threads", "memory", "os", "python", "torch", "lightning"):
        assert re.search(rf"^\| {key} \| \S", text, re.M), key
    summary = re.search(r"^\| Prepare \| peak RSS < 1 GiB .*\| (met|missed) \|$", text, re.M)
    assert summary, "the summary table has no Prepare row with a verdict"
    assert re.search(r"^\| bench_prepare \| \d+\.\d min \|$", text, re.M)
    assert "## Prepare\n" in text and "**Goal:** peak RSS < 1 GiB" in text

    # The section's own table carries real measurements of the generated PNG folder.
    png = re.search(r"^\| 28x28 PNG folder \| 2,000 \| (.+) \| (.+) \|$", text, re.M)
    assert png, "no row for the 2,000-PNG case"
    rate, rss = _figure(png.group(1)), _figure(png.group(2))
    assert rate > 0 and 20 < rss < 1024  # a Python process with numpy, within the bound
    if MNIST.is_dir():
        assert re.search(r"^\| MNIST IDX \(gzip\) \| 70,000 \| [\d,]+ ± ", text, re.M)
    else:
        assert "MNIST IDX skipped" in text


def test_a_missing_benchmark_module_fails_loudly() -> None:
    with pytest.raises(run_all.BenchError, match="bench_no_such_module not found"):
        run_all.load(["bench_prepare", "bench_no_such_module"])


@pytest.mark.parametrize(
    "args",
    [["--quick"], ["--only", "bench_prepare"], ["--quick", "--only", "bench_augment"]],
    ids=["quick", "partial", "quick-partial"],
)
def test_quick_and_partial_runs_never_write_results_md(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _state(run_all.RESULTS)
    assert run_all.main([*args, "--output", str(run_all.RESULTS)]) == 2
    assert _state(run_all.RESULTS) == before
    assert "only a full run writes" in capsys.readouterr().err


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_all.main(["--quick", "--only", "bench_nope"]) == 2
    assert "unknown benchmark bench_nope" in capsys.readouterr().err


@pytest.mark.subprocess
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU here runs the check")
def test_gpu_check_skips_cleanly_without_a_gpu() -> None:
    import subprocess

    done = subprocess.run(
        ["make", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("gpu-check:")]
    assert lines == [lines[0]] and lines[0].startswith("gpu-check: skipped: no CUDA GPU here")
    assert "Traceback" not in done.stderr


def test_gpu_bundle_lists_only_locked_distributions() -> None:
    import gpu_bundle

    pins = gpu_bundle.locked_versions(ROOT / "requirements.lock")
    wanted = gpu_bundle.requirements(pins)
    assert (
        "scipy==" + pins["scipy"] in wanted and "pydantic_core==" + pins["pydantic_core"] in wanted
    )
    assert not any(name.startswith("opencv") for name in wanted)  # GPU machines bring OpenCV


@pytest.mark.slow
@pytest.mark.subprocess
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path: Path) -> None:
    """The GPU check's smoke run on the CPU: every row runs (none out of time) and none fails.

    The machines with a GPU come rarely, so this is what keeps the script's code paths alive
    between them: the same checks as on CUDA, tiny sizes, figures meaningless.
    """
    import subprocess

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\nthe CPU figures\n")
    done = subprocess.run(
        [
            *(sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"),
            *("--budget", "900", "--results", str(results_md)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    results = {row[0].lstrip("| "): row[1] for row in rows[1:]}  # after the header
    for check in ("environment", "matmul peak", "plain loop", "ddp", "export pt2"):
        assert results.get(check) == "PASS", (check, done.stdout)
    trained = [check for check in results if check.startswith("train ")]
    half = [check for check in trained if "16-mixed" in check.split()]  # fp16 autocast is CUDA-only
    assert len(trained) == 7 and len(half) == 2, done.stdout
    assert all(results[c] == ("SKIP" if c in half else "PASS") for c in trained), done.stdout
    assert done.stdout.count("16-mixed does not run on cpu") == 2
    assert results["unit tier"] == "SKIP"  # the CUDA tests skip on a CPU, and it says so
    assert "the time budget is spent" not in done.stdout and "Traceback" not in done.stderr
    written = results_md.read_text()  # the table, with the machine, after what was there
    assert written.startswith("# Benchmark results\n\nthe CPU figures\n")
    assert "## GPU check" in written and "| export pt2 | PASS |" in written
    assert "CPU, " in written.split("| check |")[0]  # the environment line names the machine


def test_gpu_section_is_replaced_alone_and_survives_a_new_report(tmp_path: Path) -> None:
    from results_file import kept_block, markers, put_section, with_block

    begin, end = markers("gpu-check")
    results = tmp_path / "RESULTS.md"
    put_section(results, "gpu-check", "## GPU check\n\nfirst")  # no file yet: a header, then it
    assert kept_block(results, "gpu-check") == f"{begin}\n## GPU check\n\nfirst\n{end}"
    results.write_text(results.read_text() + "\n## After\n")
    put_section(results, "gpu-check", "## GPU check\n\nsecond")
    text = results.read_text()
    assert "first" not in text and "second" in text and text.endswith("## After\n")
    assert text.count(begin) == 1 and not list(tmp_path.glob(".RESULTS.md.*"))
    block = kept_block(results, "gpu-check")
    report = with_block("# Benchmark results\n\nnew CPU figures\n", "gpu-check", block)
    assert report.startswith("# Benchmark results\n\nnew CPU figures\n") and "second" in report
    absent = kept_block(tmp_path / "absent.md", "gpu-check")
    assert with_block("# no block\n", "gpu-check", absent) == "# no block\n"


def test_every_kept_section_survives_a_new_report(tmp_path: Path) -> None:
    from results_file import KEPT, kept_block, markers, put_section, with_kept_blocks

    results = tmp_path / "RESULTS.md"
    for name in KEPT:
        put_section(results, name, f"## {name}\n\nfigures of {name}")
    report = with_kept_blocks("# Benchmark results\n\nnew CPU figures\n", results)
    for name in KEPT:
        assert kept_block(results, name) is not None
        assert f"figures of {name}" in report and report.count(markers(name)[0]) == 1

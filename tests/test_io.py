"""Atomic outputs: a killed writer's temporary files are swept by the next write, nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convpipe import io

# A writer that reserves a big temporary folder, says so, then waits to be killed.
WRITER = """
import sys, time
from convpipe import io
with io.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "x.npy").write_bytes(b"0" * 4096)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _start_writer(target: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.subprocess
def test_a_killed_writers_temp_folder_is_swept_by_the_next_write(tmp_path):
    target = tmp_path / "prepared"
    killed, killed_tmp = _start_writer(target)
    running, running_tmp = _start_writer(target)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_tmp.is_dir()  # what a kill -9 leaves
        foreign = [tmp_path / ".prepared.notes.tmp", tmp_path / ".other.host-1.abc.tmp"]
        for path in foreign:
            path.write_text("not convpipe's")
        with io.atomic_dir(target) as tmp:
            (tmp / "done").write_text("ok")
        assert not killed_tmp.exists()
        assert running_tmp.is_dir(), "a running writer's folder was removed"
        assert all(path.exists() for path in foreign)
        assert (target / "done").read_text() == "ok"
    finally:
        running.kill()
        running.wait(timeout=30)


def test_a_stale_temp_file_is_swept_and_named_after_its_writer(tmp_path):
    target = tmp_path / "metrics.json"
    dead = _dead_pid()
    stale = tmp_path / f".metrics.json.{io._HOST}-{dead}.k2j4_x9a.tmp"
    stale.write_text("{")
    other_host = tmp_path / f".metrics.json.elsewhere-{dead}.k2j4_x9a.tmp"
    other_host.write_text("{")  # another node's writer on a shared disk may still run
    with io.atomic_path(target) as tmp:
        assert tmp.name.startswith(f".metrics.json.{io._HOST}-{os.getpid()}.")
        tmp.write_text("{}")
    assert not stale.exists() and other_host.exists()
    assert target.read_text() == "{}"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    time.sleep(0.05)
    return proc.pid

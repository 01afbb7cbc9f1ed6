"""The convpipe console script: validate, and the MLflow UI bound to loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.project import ROOT
from tests.helpers.servers import free_port

CONVPIPE = str(Path(sys.executable).parent / "convpipe")


def _run(*args, cwd=ROOT):
    return subprocess.run([CONVPIPE, *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_validate_ok_and_bad(tmp_path):
    ok = _run("validate")
    assert ok.returncode == 0 and "params.yaml: valid" in ok.stdout
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  lr: 0.003", "  lr: -1"))
    result = _run("--params", str(bad), "validate")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("convpipe: error: 'train.lr'")
    assert "Traceback" not in result.stderr


@pytest.mark.subprocess
def test_negative_trial_count_is_refused():
    result = _run("tune", "--n-trials", "-1")
    assert result.returncode == 2 and "--n-trials must be 0 or more" in result.stderr


def _listening(port: int) -> list[str]:
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=False).stdout
    return [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{port}")]


@pytest.mark.slow
def test_ui_binds_loopback_only(tmp_path):
    if subprocess.run(["which", "ss"], capture_output=True, check=False).returncode:
        pytest.skip("ss (iproute2) is not installed")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ui.db"}
    proc = subprocess.Popen(
        [CONVPIPE, "--params", str(ROOT / "params.yaml"), "ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while not _listening(port) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        assert _listening(port) == [f"127.0.0.1:{port}"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

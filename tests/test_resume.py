"""A real SIGKILL of a real training, then `dvc repro` again: it resumes, loses nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.project import make_project

pytestmark = pytest.mark.slow

SETTINGS = {"train.max_epochs": 8, "train.patience": 3}


def _history(root):
    with open(root / "plots/train/history.csv") as fh:
        return list(csv.DictReader(fh))


def _epochs_checkpointed(root) -> int:
    import torch

    try:
        ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    except Exception:  # being written or not there yet
        return -1
    return int(ckpt["epoch"])


def _kill_after_epochs(project, cmd: list[str], epochs: int) -> None:
    """Run ``cmd`` in the project and SIGKILL its process group once ``epochs`` are saved."""
    proc = subprocess.Popen(
        cmd,
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while _epochs_checkpointed(project.root) < epochs and time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("ref"))
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "train")
    return _history(project.root)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("killed"))
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    _kill_after_epochs(project, ["dvc", "repro", "train"], 2)
    state = json.loads((project.root / "checkpoints/resume.json").read_text())
    return project, state


def test_resumed_training_matches_an_uninterrupted_one(killed, reference):
    project, state = killed
    assert not (project.root / "models/model.ckpt").exists()
    project.run("dvc", "repro", "train")
    resumed = _history(project.root)
    assert len(resumed) == len(reference)  # same number of epochs
    for got, want in zip(resumed, reference, strict=True):
        assert abs(float(got["val/loss"]) - float(want["val/loss"])) < 1e-5
    with sqlite3.connect(project.root / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert runs == [(state["run_id"], "FINISHED")]  # the same run, continued
    run_info = json.loads((project.root / "models/mlflow_run.json").read_text())
    assert run_info["run_id"] == state["run_id"]
    assert not (project.root / "checkpoints/resume.json").exists()


def test_other_params_refuse_to_resume(tmp_path):
    project = make_project(tmp_path / "p")
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    _kill_after_epochs(project, ["python", "pipelines/train.py"], 1)
    project.set_params(**{"model.dropout": 0.4})
    result = project.run("python", "pipelines/train.py", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert lines[-1].startswith("convpipe: error: an interrupted training was found")
    assert "model.dropout" in lines[-1] and "Traceback" not in result.stderr
    assert (project.root / "checkpoints/last.ckpt").exists()  # nothing was thrown away


def test_a_truncated_last_checkpoint_starts_over_in_one_line(tmp_path, reference):
    project = make_project(tmp_path / "t")
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    _kill_after_epochs(project, ["python", "pipelines/train.py"], 1)
    last = project.root / "checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed mid-write
    result = project.run("python", "pipelines/train.py")
    assert "Traceback" not in result.stderr
    warned = [line for line in result.stderr.splitlines() if "starting the training over" in line]
    assert len(warned) == 1 and "last.ckpt unreadable" in warned[0]
    assert len(_history(project.root)) == len(reference)  # a whole training, from epoch 0


def test_a_checkpoint_convpipe_never_wrote_is_never_resumed(tmp_path):
    import torch

    project = make_project(tmp_path / "c")
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    _kill_after_epochs(project, ["python", "pipelines/train.py"], 1)
    last = project.root / "checkpoints/last.ckpt"
    data = torch.load(last, weights_only=True, map_location="cpu")
    data["hyper_parameters"]["_instantiator"] = "os.system"
    torch.save(data, last)
    result = project.run("python", "pipelines/train.py", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "never writes (_instantiator)" in lines[-1]


def _start_server(root, port: int):
    """``mlflow server`` on 127.0.0.1:``port`` over ``root``'s sqlite store, in its own group."""
    import sys
    from pathlib import Path

    from tests.conftest import wait_for_http

    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = root / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for_http(proc, f"http://127.0.0.1:{port}/health", log, 90)
    return proc


def test_a_tracking_server_that_dies_mid_training_ends_it_in_one_line_then_it_resumes(
    tmp_path, reference
):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    project = make_project(tmp_path / "s")
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    project.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    training = subprocess.Popen(
        ["python", "pipelines/train.py"],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while _epochs_checkpointed(project.root) < 2 and time.time() < deadline:
            assert training.poll() is None, training.stderr.read()
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        killed_at = time.monotonic()
        _, stderr = training.communicate(timeout=120)  # never MLflow's minutes of retries
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
    assert time.monotonic() - killed_at < 60
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert training.returncode == 2 and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("convpipe: error: MLflow stopped answering during training")
    assert "the training resumes from that epoch" in lines[-1]
    state = json.loads((project.root / "checkpoints/resume.json").read_text())
    server = _start_server(tmp_path, port)  # the store comes back
    try:
        project.run("python", "pipelines/train.py")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert len(_history(project.root)) == len(reference)  # resumed, not restarted short
    with sqlite3.connect(tmp_path / "server.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert runs == [(state["run_id"], "FINISHED")]  # the same run, continued

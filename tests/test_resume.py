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

from tests.conftest import free_port, start_mlflow_server, stop_server
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


def _start_until_epochs(project, cmd: list[str], epochs: int) -> subprocess.Popen:
    """Start ``cmd`` in the project (own process group, stderr piped); return once ``epochs``
    are checkpointed."""
    proc = subprocess.Popen(
        cmd,
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while _epochs_checkpointed(project.root) < epochs and time.time() < deadline:
        assert proc.poll() is None, f"training ended before epoch {epochs}: {proc.stderr.read()}"
        time.sleep(0.2)
    return proc


def _kill_after_epochs(project, cmd: list[str], epochs: int) -> None:
    """Run ``cmd`` in the project and SIGKILL its process group once ``epochs`` are saved."""
    proc = _start_until_epochs(project, cmd, epochs)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


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


def test_a_tracking_server_that_dies_mid_training_ends_it_in_one_line_then_it_resumes(
    tmp_path, reference
):
    port = free_port()
    project = make_project(tmp_path / "s")
    project.set_params(**SETTINGS)
    project.run("dvc", "repro", "augment")
    project.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port, tmp_path / "server.log")
    training = _start_until_epochs(project, ["python", "pipelines/train.py"], 2)
    try:
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
    server = start_mlflow_server(tmp_path, port, tmp_path / "server-again.log")  # it comes back
    try:
        project.run("python", "pipelines/train.py")
    finally:
        stop_server(server)
    assert len(_history(project.root)) == len(reference)  # resumed, not restarted short
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert runs == [(state["run_id"], "FINISHED")]  # the same run, continued

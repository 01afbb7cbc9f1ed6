"""Interrupting a real training (SIGKILL, SIGTERM, SIGUSR1) and reading what it left.

Each starts its command in the project's own process group, so a kill reaches ``dvc`` and
the stage it runs alike.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import sqlite3
import subprocess
import time


def history(root):
    with open(root / "plots/train/history.csv") as fh:
        return list(csv.DictReader(fh))


def epochs_checkpointed(root) -> int:
    import torch

    try:
        ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    except Exception:  # being written or not there yet
        return -1
    return int(ckpt["epoch"])


def start(project, cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in the project, in its own process group, stderr piped as text."""
    return subprocess.Popen(
        cmd,
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def start_until_epochs(project, cmd: list[str], epochs: int) -> subprocess.Popen:
    """Start ``cmd`` in the project (own process group, stderr piped); return once ``epochs``
    are checkpointed."""
    proc = start(project, cmd)
    deadline = time.time() + 240
    while epochs_checkpointed(project.root) < epochs and time.time() < deadline:
        assert proc.poll() is None, f"training ended before epoch {epochs}: {proc.stderr.read()}"
        time.sleep(0.2)
    return proc


def kill_after_epochs(project, cmd: list[str], epochs: int, mid_epoch: bool = False) -> None:
    """Run ``cmd`` in the project and SIGKILL its process group once ``epochs`` are saved,
    or, with ``mid_epoch``, part-way into the epoch after them (``epochs`` >= 2)."""
    if mid_epoch:
        proc = _part_way_after(project, cmd, epochs)
        assert epochs_checkpointed(project.root) == epochs  # killed inside the next epoch
    else:
        proc = start_until_epochs(project, cmd, epochs)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _part_way_after(project, cmd: list[str], epochs: int) -> subprocess.Popen:
    """Start ``cmd``; return part-way into the training batches of the epoch after ``epochs``
    saved ones.

    A third of a measured epoch (checkpoint to checkpoint): its training batches come first,
    then validation and the checkpoint. At a half, a litdata epoch (its loader's workers
    restart each epoch, its validation reads image by image) was once already validating.
    """
    proc = start_until_epochs(project, cmd, epochs - 1)
    started = time.monotonic()
    while epochs_checkpointed(project.root) < epochs:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    time.sleep((time.monotonic() - started) / 3)  # an epoch's length is measured, not assumed
    return proc


def stopped_batch(root) -> int:
    import torch

    ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    return int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"])


def signal_mid_epoch(project, signum: int) -> tuple[int, str]:
    """Train; once 2 epochs are saved, send ``signum`` part-way into the next; (exit, stderr)."""
    proc = _part_way_after(project, ["python", "pipelines/train.py"], 2)
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr


def run_status_and_tags(root) -> tuple[list[tuple[str, str]], dict[str, str]]:
    with sqlite3.connect(root / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
        tags = dict(db.execute("SELECT key, value FROM tags").fetchall())
    return runs, tags


def assert_one_preemption_line(root, returncode: int, stderr: str, signal_: signal.Signals) -> str:
    """The last line, checked to say ``signal_`` stopped the training part-way through an
    epoch, and that ``last.ckpt`` holds exactly the batch it names."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 128 + signal_ and "Traceback" not in stderr, stderr
    said = re.match(
        rf"convpipe: error: stopped by {signal_.name} at epoch \d+ after batch (\d+) of (\d+), "
        r"the state is saved in checkpoints/last\.ckpt, ",
        lines[-1],
    )
    assert said, lines[-1]
    batch, of = int(said[1]), int(said[2])
    assert 0 < batch < of and stopped_batch(root) == batch
    return lines[-1]

"""`dvc exp run --queue` with two parallel workers: every experiment ran and is accounted for."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.helpers.project import make_project

pytestmark = pytest.mark.slow

LRS = ("0.002", "0.004")


def test_queue_two_workers(tmp_path):
    project = make_project(tmp_path / "q")
    project.set_params(**{"train.max_epochs": 3})
    project.run("dvc", "repro", "augment")
    for lr in LRS:
        project.run("dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}")
    project.run("dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 420
    while time.time() < deadline:
        status = project.run("dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == len(LRS), status
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    results = [
        exp
        for entry in shown
        for exp in (entry.get("experiments") or [])
        for exp in exp.get("revs", [])
    ]
    lrs = {
        str(rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"])
        for rev in results
        if rev.get("data", {}).get("metrics")
    }
    assert lrs == set(LRS), results
    # Both queued trainings tracked into the project's own store, each as one finished run.
    with sqlite3.connect(project.root / "mlflow.db") as db:
        runs = db.execute("SELECT status FROM runs").fetchall()
        lrs_logged = {v for (v,) in db.execute("SELECT value FROM params WHERE key='train.lr'")}
    assert runs == [("FINISHED",), ("FINISHED",)]
    assert lrs_logged == set(LRS)

"""Two `convpipe tune` workers sharing one Optuna study on a real PostgreSQL server.

The server comes from tests/pg.py; the workers run the real CLI in a temporary project whose
MLflow store is the project's default sqlite file. Both start at once on a fresh database and
a fresh mlflow.db, as a user starting a campaign on two terminals would: whoever creates the
Optuna schema, the MLflow schema, the experiment and the parent run, the other must join.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers.project import Project, make_project

pytest_plugins = ["tests.helpers.pg"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKERS = 2
TRIALS_EACH = 2
STUDY = "pg-two-workers"
WORKER_TIMEOUT = 240  # seconds for both workers together


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, postgres_server):
    """Prepare data, point tune.storage at PostgreSQL, run two workers at once."""
    project = make_project(tmp_path_factory.mktemp("pgtune"))
    project.run("dvc", "repro", "augment")
    project.set_params(
        **{
            "tune.storage": postgres_server.url,
            "tune.study_name": STUDY,
            "tune.max_epochs": 3,
            "tune.heartbeat_seconds": 2,
        }
    )
    logs = run_workers(project, tmp_path_factory.mktemp("pgtune-logs"))
    return project, postgres_server, logs


def run_workers(project: Project, log_dir: Path) -> list[str]:
    """Start every worker at once, wait for all; return each one's stdout + stderr."""
    env = {**project.env, "OMP_NUM_THREADS": "1"}  # two workers share the two cores
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store, not the caller's
    cmd = ["convpipe", "tune", "--n-trials", str(TRIALS_EACH)]
    paths = [log_dir / f"worker{i}.log" for i in range(WORKERS)]
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen] = []
        stack.callback(_kill_running, procs)  # none left behind if the wait is interrupted
        for path in paths:
            out = stack.enter_context(open(path, "w", encoding="utf-8"))
            procs.append(
                subprocess.Popen(
                    cmd, cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + WORKER_TIMEOUT
        codes = [_wait(proc, deadline) for proc in procs]
    logs = [path.read_text(encoding="utf-8") for path in paths]
    for i, (code, log) in enumerate(zip(codes, logs, strict=True)):
        assert code == 0, f"worker {i} {_exit_text(code)}:\n{log}"
    return logs


def _wait(proc: subprocess.Popen, deadline: float) -> int | None:
    """The worker's exit code, or None if it outlived ``deadline`` (it is killed then)."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _exit_text(code: int | None) -> str:
    return f"was killed after {WORKER_TIMEOUT}s" if code is None else f"exited {code}"


def _mlflow(project: Project, query: str, *args: str) -> list[tuple]:
    with sqlite3.connect(project.root / "mlflow.db") as db:
        return db.execute(query, args).fetchall()


def _parent_runs(project: Project) -> list[str]:
    rows = _mlflow(
        project,
        "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'convpipe.kind' AND t.value = 'tuning' AND r.lifecycle_stage = 'active'",
    )
    return [run for (run,) in rows]


def test_study_has_every_trial_of_both_workers_finished(campaign):
    _, server, _ = campaign
    study = optuna.load_study(study_name=STUDY, storage=server.url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == WORKERS * TRIALS_EACH
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials
    ]
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS_EACH))


def test_every_trial_has_a_finished_child_run(campaign):
    project, _, _ = campaign
    marks = ",".join("?" * len(_parent_runs(project)))
    children = _mlflow(
        project,
        "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        f"WHERE t.key = 'mlflow.parentRunId' AND t.value IN ({marks})",
        *_parent_runs(project),
    )
    assert len(children) == WORKERS * TRIALS_EACH
    assert {status for (status,) in children} <= {"FINISHED", "KILLED"}


def test_workers_share_one_parent_run(campaign):
    project, server, _ = campaign
    parents = _parent_runs(project)
    assert len(parents) == 1, f"each worker opened its own parent run: {parents}"
    study = optuna.load_study(study_name=STUDY, storage=server.url)
    assert study.user_attrs["mlflow_run_id"] == parents[0]


def test_password_is_never_written_out(campaign):
    project, server, logs = campaign
    secret = server.password
    for i, log in enumerate(logs):
        assert secret not in log, f"worker {i} printed the storage password"
    reports = sorted((project.root / "reports" / "tuning").glob("*"))
    assert reports, "the campaign wrote no reports"
    for path in reports:
        assert secret.encode() not in path.read_bytes(), f"{path.name} holds the password"
    for parent in _parent_runs(project):
        params = dict(_mlflow(project, "SELECT key, value FROM params WHERE run_uuid = ?", parent))
        assert params["storage"] == server.url.replace(secret, "***")
    # Nowhere in MLflow at all: params, tags and metrics of every run, and the artifacts.
    assert secret.encode() not in (project.root / "mlflow.db").read_bytes()
    for path in (project.root / "mlruns").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"MLflow artifact {path} leaks it"

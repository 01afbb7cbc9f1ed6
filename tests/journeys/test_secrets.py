"""No secret leaves: a real training and evaluation against an authenticated MLflow server.

Secrets are planted in every channel the issue names, then the whole MLflow store (its
database, every artifact), the project's outputs and everything the commands printed are
searched for them:

- the MLflow password (``MLFLOW_TRACKING_PASSWORD``, basic auth of the server);
- a token in the project's git remote (``https://user:TOKEN@...``);
- a token in the git remote of an editable install (``pip freeze`` shows it);
- a database password holding an unencoded ``/`` in ``tune.storage`` (a logged param);
- a URL with a password in ``MLFLOW_TRACKING_URI`` of a run whose server is gone.

The server runs MLflow's ``basic-auth`` app, as the team setup in docs/scaling.md does: a client
without credentials is refused, convpipe with credentials from the environment works.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy.engine import make_url

from tests.helpers.project import ROOT, Project, make_project
from tests.helpers.servers import free_port, start_mlflow_server, stop_server, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]
pytest_plugins = ["tests.helpers.pg"]

ADMIN = "admin"
CONVPIPE = str(Path(sys.executable).with_name("convpipe"))


def _secret(name: str) -> str:
    return f"{name}S3cr{secrets.token_hex(6)}"


SECRETS = {
    "mlflow_password": _secret("mlflowpw"),
    "project_remote": _secret("remotetok"),
    "editable_remote": _secret("editabletok"),
    "database": f"Ab/{_secret('dbpw')}",  # SQLAlchemy takes '/' unencoded in a password
    "dead_server": _secret("deadpw"),
}


def start_auth_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 with an admin of our password."""
    (root / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {SECRETS['mlflow_password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    return start_mlflow_server(root, port, root / "server.log", app="basic-auth", env=env)


def plant_editable_install(root: Path) -> Path:
    """A site folder holding an editable install whose git remote carries a token.

    pip freeze shows such an install as ``-e git+<remote>@<commit>#egg=<name>``.
    """
    source = root / "planted-src"
    source.mkdir()
    git = ["git", "-C", str(source)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    remote = f"https://user:{SECRETS['editable_remote']}@git.example.com/o/planted.git"
    subprocess.run([*git, "remote", "add", "origin", remote], check=True)
    info = root / "site" / "planted-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: planted\nVersion: 0.1\n")
    (info / "RECORD").write_text("")
    direct = {"url": source.as_uri(), "dir_info": {"editable": True}}
    (info / "direct_url.json").write_text(json.dumps(direct))
    return root / "site"


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> dict[str, object]:
    """A trained, evaluated, registered project on an authenticated server, and what it printed."""
    base = tmp_path_factory.mktemp("secrets")
    server_root = base / "server"
    server_root.mkdir()
    port = free_port()
    server = start_auth_server(server_root, port)
    try:
        project = make_project(base / "project")
        project.run(
            "git",
            "remote",
            "add",
            "origin",
            f"https://ci:{SECRETS['project_remote']}@git.example.com/team/convpipe.git",
        )
        site = plant_editable_install(base)
        project.env["PYTHONPATH"] += os.pathsep + str(site)
        database = f"postgresql+psycopg2://optuna:{SECRETS['database']}@db.example.internal/optuna"
        project.set_params(
            **{
                "mlflow.tracking_uri": f"http://127.0.0.1:{port}",
                "tune.storage": database,
                "train.max_epochs": 2,
            }
        )
        project.run("git", "commit", "-q", "-am", "team server")
        anonymous = project.run("dvc", "repro", check=False)
        project.env["MLFLOW_TRACKING_USERNAME"] = ADMIN
        project.env["MLFLOW_TRACKING_PASSWORD"] = SECRETS["mlflow_password"]
        trained = project.run("dvc", "repro")
        dead = subprocess.run(
            [sys.executable, "pipelines/train.py"],
            cwd=project.root,
            env={
                **project.env,
                "MLFLOW_TRACKING_URI": f"http://u:{SECRETS['dead_server']}@127.0.0.1:{free_port()}",
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        run_id = json.loads((project.root / "metrics/train.json").read_text())["mlflow_run_id"]
        with _credentials():
            client = MlflowClient(f"http://127.0.0.1:{port}")
            run = client.get_run(run_id)
            freeze_path = client.download_artifacts(
                run_id, "environment/pip-freeze.txt", str(base / "download")
            )
        return {
            "project": project,
            "server_root": server_root,
            "port": port,
            "anonymous": anonymous,
            "trained": trained,
            "dead": dead,
            "run": run,
            "freeze": Path(freeze_path).read_text(),
        }
    finally:
        stop_server(server)


@contextlib.contextmanager
def _credentials() -> Iterator[None]:
    """This process's MLflow client logs in as the admin while inside."""
    os.environ["MLFLOW_TRACKING_USERNAME"] = ADMIN
    os.environ["MLFLOW_TRACKING_PASSWORD"] = SECRETS["mlflow_password"]
    try:
        yield
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


def _files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part in skip for part in path.relative_to(root).parts)
    ]


def test_an_unauthenticated_client_is_refused_in_one_line(journey) -> None:
    proc = journey["anonymous"]
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("convpipe: error:")]
    assert len(errors) == 1, proc.stderr
    assert "401" in errors[0] and "MLFLOW_TRACKING_USERNAME" in errors[0]
    assert "Traceback" not in proc.stderr


def test_with_credentials_from_the_environment_the_run_is_tracked(journey) -> None:
    run = journey["run"]
    assert run.info.status == "FINISHED"
    assert "val/acc" in run.data.metrics
    project: Project = journey["project"]
    evaluation = json.loads((project.root / "metrics/eval.json").read_text())
    assert evaluation["accuracy"] > 0.2


def test_every_channel_was_exercised_and_masked(journey) -> None:
    run = journey["run"]
    assert run.data.params["tune.storage"] == (
        "postgresql+psycopg2://optuna:***@db.example.internal/optuna"
    )
    assert run.data.tags["mlflow.source.git.repoURL"] == (
        "https://ci:***@git.example.com/team/convpipe.git"
    )
    assert "-e git+https://user:***@git.example.com/o/planted.git@" in journey["freeze"]
    dead = journey["dead"]
    assert dead.returncode == 2
    assert "unreachable" in dead.stderr and "http://u:***@127.0.0.1:" in dead.stderr


def test_no_planted_secret_is_anywhere(journey) -> None:
    project: Project = journey["project"]
    server_root: Path = journey["server_root"]
    # params.yaml and dvc.lock are the user's own copy of tune.storage (docs/scaling.md says to
    # keep passwords out of it: PGPASSWORD, ~/.pgpass); .git and DVC's cache hold the same
    places = _files(server_root, skip=("auth.ini",)) + _files(
        project.root, skip=(".git", ".dvc", "params.yaml", "dvc.lock", "src", "pipelines")
    )
    assert any(p.name == "mlflow.db" for p in places) and any(
        "artifacts" in p.parts for p in places
    )
    texts = {str(p): p.read_bytes() for p in places}
    for name in ("anonymous", "trained", "dead"):
        proc = journey[name]
        texts[name] = (proc.stdout + proc.stderr).encode()
    leaks = [
        f"{secret_name} in {where}"
        for secret_name, secret in SECRETS.items()
        for where, data in texts.items()
        if secret.encode() in data
    ]
    assert leaks == []


def test_the_ui_command_keeps_the_store_uri_off_the_command_line(tmp_path, postgres_server) -> None:
    # the plain postgresql:// form (psycopg 3 under SQLAlchemy 2.1), password in the URL
    postgres_server.create_database("ui")
    uri = postgres_server.url_of("ui", driver="")
    password = make_url(uri).password
    assert password
    port = free_port()
    proc = subprocess.Popen(
        [CONVPIPE, "--params", str(ROOT / "params.yaml"), "ui", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log = tmp_path / "ui.log"
        log.write_text("")
        wait_for_http(proc, f"http://127.0.0.1:{port}/health", log, 120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200
        command_lines = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    command_lines.append((entry / "cmdline").read_bytes())
                except OSError:
                    continue
        assert not [line for line in command_lines if password.encode() in line]
    finally:
        stop_server(proc)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert password not in output and "MLflow UI for postgresql://convpipe:***@" in output

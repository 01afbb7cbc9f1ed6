"""PostgreSQL URLs in both forms, the password from the URL, PGPASSWORD or the password file.

SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3 and ``postgresql+psycopg2://`` to psycopg2;
both are installed (the ``postgres`` extra) and both reach a real server here, for Optuna's
storage (as ``convpipe tune`` opens it) and for MLflow's tracking store.
"""

from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient

from convpipe.tuning.storage import open_storage

pytest_plugins = ["tests.helpers.pg"]
pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(300)]

DRIVERS = {"psycopg 3": "", "psycopg2": "psycopg2"}


@pytest.mark.parametrize("driver", DRIVERS.values(), ids=DRIVERS.keys())
def test_optuna_storage_in_both_url_forms(postgres_server, driver) -> None:
    name = f"optuna_{driver or 'plain'}"
    postgres_server.create_database(name)
    url = postgres_server.url_of(name, driver=driver)
    assert url.startswith("postgresql://" if not driver else "postgresql+psycopg2://")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="both-forms")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


@pytest.mark.parametrize("driver", DRIVERS.values(), ids=DRIVERS.keys())
def test_mlflow_store_in_both_url_forms(postgres_server, driver) -> None:
    name = f"mlflow_{driver or 'plain'}"
    postgres_server.create_database(name)
    client = MlflowClient(postgres_server.url_of(name, driver=driver))
    experiment = client.create_experiment("both-forms")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "val/acc", 0.5)
    assert client.get_run(run.info.run_id).data.metrics["val/acc"] == 0.5


@pytest.mark.parametrize("source", ["PGPASSWORD", "password file"])
def test_the_password_may_come_from_libpq(postgres_server, monkeypatch, tmp_path, source):
    name = f"libpq_{source.replace(' ', '_').lower()}"
    postgres_server.create_database(name)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    if source == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    else:  # ~/.pgpass, found where PGPASSFILE says (libpq's own lookup)
        passfile = tmp_path / "pgpass"
        passfile.write_text(
            f"127.0.0.1:{postgres_server.port}:{name}:{postgres_server.user}:"
            f"{postgres_server.password}\n"
        )
        passfile.chmod(0o600)  # libpq ignores a password file others can read
        monkeypatch.setenv("PGPASSFILE", str(passfile))
    for driver in DRIVERS.values():
        url = postgres_server.url_of(name, driver=driver, password=False)
        assert postgres_server.password not in url
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name=f"libpq-{driver or 'plain'}")

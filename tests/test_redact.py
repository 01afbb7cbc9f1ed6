"""redact.mask: every secret a text can carry is masked; texts without one stay as they are."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from convpipe.redact import MaskedStream, environment_secrets, mask


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("http://alice:s3cr%40t@mlflow.example.com/", "http://alice:***@mlflow.example.com/"),
        ("http://u:secret@[::1]:5000/path", "http://u:***@[::1]:5000/path"),
        ("https://u:secret@Host.Example:8443", "https://u:***@Host.Example:8443"),
        ("mysql://u:secret@h/db?charset=utf8", "mysql://u:***@h/db?charset=utf8"),
        ("postgresql://h/db?user=u&password=secret", "postgresql://h/db?user=u&password=***"),
        ("http://h:5000/?token=secret", "http://h:5000/?token=***"),
        # unencoded '/', '#', '?' in a password: SQLAlchemy's make_url accepts them
        ("postgresql+psycopg2://u:Ab/Cd3fsecret@host/db", "postgresql+psycopg2://u:***@host/db"),
        ("postgresql://u:a#b?secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        # pip freeze of an editable install cloned with a token
        (
            "-e git+https://user:secretTOKEN@git.example.com/o/r.git@0a1b2c#egg=convpipe",
            "-e git+https://user:***@git.example.com/o/r.git@0a1b2c#egg=convpipe",
        ),
        ("https://ghp_secret123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("http://user@h:5000", "http://***@h:5000"),  # a user alone in http(s) is a token
        # connection strings and exception texts quoting a URI
        ("host=h password=secret dbname=d", "host=h password=*** dbname=d"),
        (
            "MlflowException: API request to http://u:secret@h:5000/api/2.0 failed",
            "MlflowException: API request to http://u:***@h:5000/api/2.0 failed",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=secret&a=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&a=1",
        ),
        (
            "https://acct.blob.core.windows.net/c?sv=1&sig=secret",
            "https://acct.blob.core.windows.net/c?sv=1&sig=***",
        ),
    ],
)
def test_mask_hides_every_secret(text: str, expected: str) -> None:
    masked = mask(text)
    assert masked == expected
    assert "secret" not in masked.lower() and "s3cr" not in masked


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "http://127.0.0.1:5000",
        "ssh://git@github.com/o/r.git",
        "git@github.com:o/r.git",
        "-e git+https://github.com/o/r.git@0a1b2c#egg=convpipe",
        "databricks",
        "postgresql://h/db?sslmode=require",
        "postgresql://user@h/db",
        "journal:tuning/journal.log",
        "epoch 3: val/acc 0.91, 1,234 images/s",
        "",
    ],
)
def test_mask_keeps_texts_without_a_secret(text: str) -> None:
    assert mask(text) == text


def test_mask_is_idempotent() -> None:
    once = mask("postgresql://u:Ab/Cd@h/db and https://tok@h and ?token=x")
    assert mask(once) == once


def test_secret_environment_values_are_masked_anywhere(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-long")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKxyz/987654321")
    monkeypatch.setenv("PGPASSWORD", "abc")  # too short to mask by value: chance matches
    monkeypatch.setenv("HOME_DIR_NAME", "hunter2-other")  # not a secret's name
    assert "hunter2-long" in environment_secrets()
    text = "login hunter2-long failed; key AKxyz/987654321; abc; hunter2-other"
    assert mask(text) == "login *** failed; key ***; abc; hunter2-other"


def test_masked_stream_masks_what_is_written(capsys) -> None:
    stream = MaskedStream(sys.stdout)
    assert stream.write("to postgresql://u:secret@h/db\n") == len("to postgresql://u:secret@h/db\n")
    stream.writelines(["https://tok123@h\n"])
    stream.flush()
    assert capsys.readouterr().out == "to postgresql://u:***@h/db\nhttps://***@h\n"


@pytest.mark.subprocess
def test_an_entry_point_masks_logs_prints_warnings_and_tracebacks() -> None:
    script = """
import logging, sys, warnings
from convpipe.errors import entrypoint

@entrypoint
def main():
    logging.basicConfig(stream=sys.stderr)
    logging.getLogger("mlflow.store").warning("store at %s", "postgresql://u:secretA@h/db")
    print("tracking to http://u:secretB@h:5000")
    warnings.warn("cannot reach https://secretC@h")
    raise RuntimeError("a bug, connecting to mysql://u:secretD@h/db")

main()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in out and "a bug, connecting to mysql://u:***@h/db" in out
    for secret in ("secretA", "secretB", "secretC", "secretD"):
        assert secret not in out
    assert "postgresql://u:***@h/db" in out and "http://u:***@h:5000" in out


def test_log_records_are_masked_at_creation(caplog) -> None:
    from convpipe.redact import install

    streams, factory = (sys.stdout, sys.stderr), logging.getLogRecordFactory()
    install()
    try:
        with caplog.at_level(logging.INFO, logger="optuna"):
            logging.getLogger("optuna").info("storage %s", "postgresql://u:secretE@h/db")
        assert "secretE" not in caplog.text and "postgresql://u:***@h/db" in caplog.text
    finally:
        sys.stdout, sys.stderr = streams
        logging.setLogRecordFactory(factory)

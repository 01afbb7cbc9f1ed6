"""The MLflow tracking store: its URI, whether it answers, its errors; passwords never shown."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from convpipe.config.schema import MlflowParams
from convpipe.errors import ConvpipeError, disk_full, disk_full_cause
from convpipe.io import exclusive_lock
from convpipe.redact import mask

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


ENV_URI = "MLFLOW_TRACKING_URI"

# MLflow 3's UI opens an experiment of this kind on its training runs, not on GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

MODEL_TRAINING = "custom_model_development"

CONNECT_TIMEOUT_S = 5.0

# MLflow's client retries a dead server for minutes (7 retries, backoff factor 2, 120 s
# timeout); a training should learn in seconds that its server is gone. A user's own
# setting of these variables wins.
FAIL_FAST_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def repo_root() -> Path:
    """The project folder: ``$DVC_ROOT`` under DVC, else the current folder.

    DVC sets ``DVC_ROOT`` to the project also for queued experiments, which run in a copy.
    """
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(params: MlflowParams) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri``.

    A relative sqlite path is taken from the project folder, so ``dvc exp run --queue``
    experiments, which run in temporary copies, still track into the project's store.
    """
    uri = os.environ.get(ENV_URI) or params.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(repo_root() / uri.removeprefix(prefix))
    return uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first steps of local processes on one store (MLflow's or Optuna's).

    Two processes that open a fresh sqlite store at once both create its schema and one dies
    (MLflow: "duplicate column", Optuna: "UNIQUE constraint failed: alembic_version"); two
    tuning workers would both create a parent run.
    """
    key = uri
    if uri.startswith("sqlite:///"):
        key = str(Path(uri.removeprefix("sqlite:///")).resolve())
    name = f"convpipe-store-{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock"
    with exclusive_lock(Path(tempfile.gettempdir()) / name):  # not POSIX: start workers apart
        yield


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training, so the MLflow UI opens on its training runs.

    MLflow 3's UI otherwise treats an untagged experiment as GenAI and opens on traces.
    A kind the user set is kept.

    Args:
        client: A client of the tracking store.
        experiment_id: The experiment to tag.
    """
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlruns/`` in the project for a local store.

    MLflow's own default is ``./mlruns`` of whatever folder first creates the experiment,
    which for a queued DVC experiment is a temporary copy that is deleted afterwards.
    """
    if uri.startswith("sqlite:"):
        return (repo_root() / "mlruns").as_uri()
    return None


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when an ``http(s)://`` tracking server does not answer.

    MLflow's own client retries for minutes before giving up; a user deserves to know in
    seconds that the server is down. Later requests of this process then fail fast too
    (:data:`FAIL_FAST_HTTP`), so a server that dies mid-training ends it in seconds.

    Raises:
        ConvpipeError: If nothing accepts a TCP connection at the URI's host and port.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    for name, value in FAIL_FAST_HTTP.items():
        os.environ.setdefault(name, value)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConvpipeError(
            "MLflow tracking URI has an invalid port",
            f"at {mask(uri)}",
            f"fix mlflow.tracking_uri / {ENV_URI}",
        ) from None
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConvpipeError(
            f"MLflow tracking server unreachable ({exc.strerror or exc})",
            f"at {mask(uri)}",
            f"start it, or set mlflow.tracking_uri / {ENV_URI} to a reachable store",
        ) from None


class TrackingLost(ConvpipeError):
    """The tracking store stopped answering while a training ran (it can be resumed)."""


def is_tracking_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from the tracking store (MLflow's client or its HTTP layer)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(exc, (TrackingLost, MlflowException, RequestException))


def mlflow_error(exc: Exception, uri: str, doing: str) -> ConvpipeError:
    """A one-line user error for an MLflow failure while ``doing`` something at ``uri``."""
    cause = disk_full_cause(exc)
    if cause is not None:  # the artifact store's disk, when it is a local folder
        return disk_full(cause)
    first = mask(" ".join(str(getattr(exc, "message", exc)).split()))[:300]
    todo = f"check mlflow.tracking_uri / {ENV_URI} and that the store is writable"
    if _refused(exc):
        todo = (
            "the server wants credentials: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the environment (never in the URI)"
        )
    return ConvpipeError(
        f"MLflow failed while {doing} ({type(exc).__name__}: {first})", f"at {mask(uri)}", todo
    )


def _refused(exc: Exception) -> bool:
    """Whether the server refused the request for lack of (valid) credentials: 401 / 403."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(getattr(exc, "message", exc))
    return status in (401, 403) or any(f"error code {code}" in text for code in (401, 403))

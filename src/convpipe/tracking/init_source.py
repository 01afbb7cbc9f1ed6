"""Where ``model.init_from`` points: a local file, a registered MLflow model or a run's artifact.

:func:`identify` says *which* weights a source means without reading them (a file's sha256, a
registered version's number and run): the ``init`` stage writes it to ``paths.init_source``,
which ``train`` depends on, so a new champion or a changed file retrains and nothing else does.
:func:`fetched` gives a local file to read (downloading an MLflow model into a temporary folder
that is removed afterwards).

Sources::

    path/to/model.ckpt | weights.pt     a convpipe checkpoint or a state dict of its network
    models:/<name>@<alias>              a registered model version (e.g. @champion)
    models:/<name>/<version>
    runs:/<run_id>/<artifact path>      a run's checkpoint or logged model
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from convpipe.errors import ConvpipeError
from convpipe.io import content_hash
from convpipe.redact import mask
from convpipe.tracking.store import mlflow_error

__all__ = ["MLFLOW_SCHEMES", "Fetched", "fetched", "identify", "is_mlflow"]

MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow(source: str) -> bool:
    """Whether ``source`` is an MLflow model or run URI rather than a local path."""
    return source.startswith(MLFLOW_SCHEMES)


def _local(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no file"
        raise ConvpipeError(
            f"model.init_from names {what}",
            f"at {source}",
            "give a convpipe .ckpt, a weights file, models:/<name>@<alias> or runs:/<id>/<path>",
        )
    return path


def _version(source: str, uri: str) -> Any:
    """The registered model version a ``models:/`` URI means right now."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=uri)
    try:
        name, version = get_model_name_and_version(client, source)
        return client.get_model_version(name, version)
    except Exception as exc:  # MLflow raises many types for a missing model or a dead store
        raise _mlflow_failure(exc, source, uri) from None


def _mlflow_failure(exc: Exception, source: str, uri: str) -> ConvpipeError:
    if (
        "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))
        or "not found" in str(exc).lower()
    ):
        return ConvpipeError(
            f"model.init_from: MLflow has no {source}",
            f"in the tracking store {mask(uri)}",
            "check the name and alias or version (`mlflow models` / the MLflow UI's Models "
            "page), and mlflow.tracking_uri",
        )
    return mlflow_error(exc, uri, f"looking up model.init_from {source}")


def identify(source: str | None, uri: str) -> dict[str, Any]:
    """What the weights of ``source`` are, as plain data that changes exactly when they do.

    Args:
        source: ``model.init_from`` (None: no init).
        uri: The MLflow tracking URI (``models:/`` and ``runs:/`` are looked up there).

    Returns:
        ``{"init_from": None}``; for a file its sha256; for a registered model its name,
        version and source run; for a run URI the URI (run artifacts are written once).

    Raises:
        ConvpipeError: A missing file or registered model, an unreachable store.
    """
    if source is None:
        return {"init_from": None}
    if source.startswith("models:/"):
        version = _version(source, uri)
        return {
            "init_from": source,
            "registered_model": version.name,
            "version": str(version.version),
            "run_id": version.run_id,
        }
    if source.startswith("runs:/"):
        return {"init_from": source, "run_id": source.removeprefix("runs:/").split("/")[0]}
    return {"init_from": source, "sha256": content_hash([_local(source)])}


@dataclass
class Fetched:
    """A local copy of the source's weights file, and where they came from.

    Attributes:
        path: The file to read (a checkpoint or state dict).
        label: The source as the user named it, passwords masked (for messages and tags).
        run_id: The MLflow run that produced the weights, when known.
    """

    path: Path
    label: str
    run_id: str | None


def _checkpoint_in(folder: Path, source: str) -> Path:
    """The checkpoint file of a downloaded model folder (its MLmodel names it) or artifact."""
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        pyfunc = (spec.get("flavors") or {}).get("python_function") or {}
        path = ((pyfunc.get("artifacts") or {}).get("checkpoint") or {}).get("path")
        if isinstance(path, str) and (folder / path).is_file():
            return folder / path
    found = sorted(folder.rglob("*.ckpt"))
    if len(found) == 1:
        return found[0]
    raise ConvpipeError(
        f"model.init_from: {source} holds {len(found) or 'no'} checkpoint files, not one",
        "in MLflow",
        "name a convpipe model (models:/<name>@<alias>) or one .ckpt artifact (runs:/<id>/<path>)",
    )


def _artifact_uri(source: str, uri: str) -> str:
    """Where ``source``'s files are, looked up in the store at ``uri``.

    MLflow resolves a ``models:/`` URI through its process-wide registry URI, whatever
    tracking URI ``download_artifacts`` is given: a project whose ``mlflow.tracking_uri``
    names another store would be looked up in ``./mlflow.db``. The version is found here,
    in the store the params name, and its artifact location downloaded instead.
    """
    if not source.startswith("models:/"):
        return source
    from mlflow import MlflowClient

    version = _version(source, uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_download_uri(version.name, version.version))


@contextmanager
def fetched(source: str, uri: str) -> Iterator[Fetched]:
    """A local file with the weights ``source`` names, for as long as the context lasts.

    Raises:
        ConvpipeError: The source cannot be found or downloaded, or holds no one checkpoint.
    """
    if not is_mlflow(source):
        yield Fetched(_local(source), source, None)
        return
    import mlflow

    run_id = identify(source, uri).get("run_id")
    with tempfile.TemporaryDirectory(prefix="convpipe-init-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=_artifact_uri(source, uri), dst_path=tmp, tracking_uri=uri
                )
            )
        except Exception as exc:  # a missing artifact, a dead server
            raise _mlflow_failure(exc, source, uri) from None
        path = local if local.is_file() else _checkpoint_in(local, source)
        yield Fetched(path, source, run_id)

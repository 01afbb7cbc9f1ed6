"""MLflow: where runs go, what identifies them, and how stages find the run of a training.

The train stage opens the run (through Lightning's MLFlowLogger) and writes its id to
``paths.run_info``; the evaluate stage reads that file and logs into the same run. The
tracking URI is always passed explicitly, because MLFlowLogger would otherwise fall back to a
``file:`` store that MLflow ≥ 3.13 rejects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convpipe.config import MlflowParams, Params
from convpipe.data.dataset import Manifest
from convpipe.errors import ConvpipeError
from convpipe.io import write_json

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.tracking import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
# What `dvc exp run` (in the workspace or from the queue) tells the stages it runs.
ENV_EXP_NAME = "DVC_EXP_NAME"
ENV_EXP_BASELINE = "DVC_EXP_BASELINE_REV"
EXP_NAME_TAG = "dvc.exp_name"
BASELINE_TAG = "dvc.exp_baseline_rev"
COMMIT_TAG = "git.commit"
# The hash-locked environment `make setup` installs, and the run's record of it.
LOCK_FILE = "requirements.lock"
LOCK_TAG = "convpipe.lock_sha256"
FREEZE_ARTIFACT = "environment/pip-freeze.txt"
# MLflow 3's UI opens an experiment of this kind on its training runs, not on GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Contexts are the manifest's own split names, so a dataset reads the same in DVC and MLflow.
DATASET_CONTEXTS = ("train", "val", "test")
DIGEST_LENGTH = 16  # of the manifest's sha256 (MLflow stores at most 36 characters)
CONNECT_TIMEOUT_S = 5.0
MASK = "***"
# query-string keys whose values are secrets (e.g. ``postgresql://h/db?password=...``)
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "access_key", "api_key")
# MLflow's client retries a dead server for minutes (7 retries, backoff factor 2, 120 s
# timeout); a training should learn in seconds that its server is gone. A user's own
# setting of these variables wins.
FAIL_FAST_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow limits: values per log_batch call, characters per param value
PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


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
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (start workers a few seconds apart)
        yield
        return
    key = uri
    if uri.startswith("sqlite:///"):
        key = str(Path(uri.removeprefix("sqlite:///")).resolve())
    name = f"convpipe-store-{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock"
    try:
        handle = open(Path(tempfile.gettempdir()) / name, "a+")  # noqa: SIM115
    except OSError:  # e.g. another user's lock file: go on unserialised
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _mask_query(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
        return query
    masked = [(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
    return urllib.parse.urlencode(masked, safe="*")


def mask_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (safe to print, log and store).

    Both the ``user:password@`` part and secret query parameters (``?password=...``,
    ``?token=...``) are masked; the rest of the URI is kept verbatim.
    """
    parts = urllib.parse.urlsplit(uri)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    query = _mask_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


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
            f"at {mask_uri(uri)}",
            f"fix mlflow.tracking_uri / {ENV_URI}",
        ) from None
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConvpipeError(
            f"MLflow tracking server unreachable ({exc.strerror or exc})",
            f"at {mask_uri(uri)}",
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
    first = " ".join(str(getattr(exc, "message", exc)).split())[:300]
    return ConvpipeError(
        f"MLflow failed while {doing} ({type(exc).__name__}: {first})",
        f"at {mask_uri(uri)}",
        f"check mlflow.tracking_uri / {ENV_URI} and that the store is writable",
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``("section.key", value)`` for every leaf; lists stay whole values."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def params_for_mlflow(params: Params) -> dict[str, str]:
    """Every resolved param as ``{"train.lr": "0.003", ...}``, URIs masked.

    Lists (e.g. ``model.conv``) are one JSON value each; values are never truncated below
    MLflow's own limit.
    """
    out = {}
    for key, value in flatten(masked_params(params)):
        out[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _mask_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_tree(v) for v in value]
    return mask_uri(value) if isinstance(value, str) and "://" in value else value


def masked_params(params: Params) -> dict[str, Any]:
    """``params`` as a plain nested mapping with every URL's password masked.

    Any string value that is a URL is masked, whatever its key (``mlflow.tracking_uri``,
    ``tune.storage``, ...), so no database password reaches a run or an artifact.
    """
    return dict(_mask_tree(params.model_dump(mode="json")))


def log_params(client: MlflowClient, run_id: str, values: Mapping[str, str]) -> None:
    """Log ``values`` as run params in batches of at most MLflow's 100 per request."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in values.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _read_lock(path: Path) -> dict[str, Any]:
    """The ``stages`` mapping of a ``dvc.lock`` file ({} when it has none)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(path)
    except (OSError, YAMLError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConvpipeError(
            f"cannot read dvc.lock ({first})", f"at {path}", "restore it or rerun `dvc repro`"
        ) from None
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def dvc_lock_hashes(lock: str | Path = "dvc.lock", stages: tuple[str, ...] = ()) -> dict[str, str]:
    """``{"dvc.<stage>.<out path>": md5}`` for the outputs recorded in ``dvc.lock``.

    Args:
        lock: The lock file; a missing file gives ``{}`` (not a DVC run).
        stages: Only these stages (all when empty).

    Raises:
        ConvpipeError: If the file exists but is not readable YAML.
    """
    path = Path(lock)
    if not path.exists():
        return {}
    tags = {}
    for stage, entry in _read_lock(path).items():
        if stages and stage not in stages:
            continue
        outs = entry.get("outs") if isinstance(entry, dict) else None
        for out in outs or []:
            if isinstance(out, dict) and "path" in out:
                tags[f"dvc.{stage}.{out['path']}"] = str(out.get("md5", ""))
    return tags


def run_tags(input_stages: tuple[str, ...], lock: str | Path = "dvc.lock") -> dict[str, str]:
    """Tags tying a run to its code, environment, data and DVC experiment.

    Git commit and dirty flag, the hash of ``requirements.lock`` (:func:`environment_tags`),
    the ``dvc.lock`` hashes of the input stages' outputs, and under ``dvc exp run`` the
    experiment's name and baseline commit, so that a run found in MLflow leads to
    ``dvc exp show`` in one step. ``mlflow.source.git.commit`` (the UI's "Version")
    is set to the same commit.

    Args:
        input_stages: The DVC stages whose outputs the run reads.
        lock: The ``dvc.lock`` file to read hashes from.
    """
    tags = dvc_lock_hashes(lock, stages=input_stages) | environment_tags()
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags[COMMIT_TAG] = commit or "unknown"
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    experiment = os.environ.get(ENV_EXP_NAME)
    baseline = os.environ.get(ENV_EXP_BASELINE) or commit
    if experiment:
        tags[EXP_NAME_TAG] = experiment
        tags[BASELINE_TAG] = baseline or "unknown"
    return tags


def environment_tags(root: Path | None = None) -> dict[str, str]:
    """The sha256 of the project's ``requirements.lock`` (``none`` without one), Python's version.

    Args:
        root: The project folder; :func:`repo_root` when omitted.
    """
    lock = (root or repo_root()) / LOCK_FILE
    try:
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    except OSError:
        digest = "none"
    return {LOCK_TAG: digest, "python.version": platform.python_version()}


def pip_freeze() -> str:
    """``pip freeze --all`` of the running interpreter: what the run really imported from.

    Falls back to ``name==version`` from the installed metadata where pip cannot run.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    lines = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}
    return "".join(f"{line}\n" for line in sorted(lines, key=str.lower))


def training_note(tags: Mapping[str, str]) -> str:
    """The run's description in the MLflow UI (``mlflow.note.content``): where it came from."""
    experiment = tags.get(EXP_NAME_TAG)
    if experiment:
        return (
            f"DVC experiment `{experiment}` on baseline `{tags.get(BASELINE_TAG, '')[:7]}`: "
            f"`dvc exp show` lists it, `dvc exp apply {experiment}` restores it."
        )
    return f"`dvc repro` at commit `{tags.get(COMMIT_TAG, 'unknown')[:7]}`."


def run_name(tags: Mapping[str, str]) -> str:
    """The MLflow run name of a training: what the run is, unique among runs.

    Under ``dvc exp run`` it is the DVC experiment's name. Otherwise it is the commit, the
    start time and six random hex digits from the OS: never a name drawn from Python's
    ``random``, which ``seed_everything`` seeds identically for every run (MLflow's own
    generated names would then repeat).

    Args:
        tags: The run's tags, from :func:`run_tags`.
    """
    experiment = tags.get(EXP_NAME_TAG)
    if experiment:
        return experiment
    commit = tags.get(COMMIT_TAG, "unknown")
    where = commit[:7] if commit != "unknown" else "nogit"
    return f"train-{where}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def dataset_inputs(
    manifest: Manifest, augmented: Manifest | None, origin: str
) -> list[DatasetInput]:
    """The data a training reads, as MLflow dataset inputs (the UI's Dataset column).

    One dataset per split of the prepare manifest, named ``<source>-<split>`` with the
    split as context, plus the augmented train copies when there are any. The digest is the
    manifest's content hash (shortened to what MLflow stores), so runs on the same data show
    the same dataset; the profile holds the image count, classes and image shape.

    Args:
        manifest: The prepare manifest.
        augmented: The augment manifest, or None when training reads no augmented copies.
        origin: Where the raw data came from: a path, or a loader name for built-in data.
    """
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    h, w = manifest.image_hw
    source: dict[str, Any]
    if "://" in origin:
        source_type, source = "url", {"uri": mask_uri(origin)}
    elif (repo_root() / origin).exists():  # data.path is relative to the project, not the cwd
        source_type, source = "local", {"uri": str((repo_root() / origin).resolve())}
    else:
        source_type, source = "code", {"tags": {"loader": origin}}
    tensors = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, manifest.channels), "images")]),
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]),
    )
    schema = json.dumps(tensors.to_dict())
    parts = [(manifest, split, split) for split in DATASET_CONTEXTS if split in manifest.splits]
    if augmented is not None and augmented.splits.get("train") and augmented.splits["train"].count:
        parts.append((augmented, "train", "train-augmented"))
    inputs = []
    for owner, split, label in parts:
        profile = {
            "num_rows": owner.splits[split].count,
            "num_classes": owner.num_classes,
            "image_shape": [h, w, owner.channels],
            "content_hash": owner.content_hash,
        }
        dataset = Dataset(
            name=f"{manifest.source}-{label}",
            digest=owner.content_hash.rpartition(":")[2][:DIGEST_LENGTH],
            source_type=source_type,
            source=json.dumps(source),
            schema=schema,
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return inputs


@dataclass(frozen=True)
class RunInfo:
    """Which MLflow run a training wrote to; saved beside the model for later stages."""

    run_id: str
    experiment_id: str
    tracking_uri: str  # masked: never holds a password

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> RunInfo:
        """Read the file the train stage wrote.

        Raises:
            ConvpipeError: If the file is missing or not a run record.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            info = cls(**data)
        except FileNotFoundError:
            raise ConvpipeError(
                "no MLflow run recorded", f"in {path}", "run `dvc repro train` first"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise ConvpipeError(
                f"unreadable run record ({exc})", f"in {path}", "rerun `dvc repro train`"
            ) from None
        if not all(isinstance(v, str) and v for v in dataclasses.astuple(info)):
            raise ConvpipeError(
                "run record fields must be non-empty strings", f"in {path}", "rerun dvc repro train"
            )
        return info

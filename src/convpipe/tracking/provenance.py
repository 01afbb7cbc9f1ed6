"""What identifies a run: code, data and environment tags, dataset inputs, run info."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convpipe.data.manifest import Manifest
from convpipe.errors import ConvpipeError
from convpipe.io import write_json

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

from convpipe.redact import mask
from convpipe.tracking.store import repo_root

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

# Contexts are the manifest's own split names, so a dataset reads the same in DVC and MLflow.
DATASET_CONTEXTS = ("train", "val", "test")

DIGEST_LENGTH = 16  # of the manifest's sha256 (MLflow stores at most 36 characters)


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
    remote = _git("remote", "get-url", "origin")
    if remote:  # MLflow's own copy misses a password holding a '/': set it masked here
        tags["mlflow.source.git.repoURL"] = mask(remote)
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

    Secrets are masked (:func:`~convpipe.redact.mask`): pip shows an editable install as
    ``-e git+<remote>@<commit>``, the remote with the token it was cloned with.

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
            return mask(proc.stdout)  # an editable install shows its git remote, token and all
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


#: Where a fine-tuned run's weights started (``model.init_from``, passwords masked) ...
INIT_TAG = "convpipe.init_from"
#: ... and the MLflow run that trained them, when they came from MLflow.
INIT_RUN_TAG = "convpipe.init_from.run_id"


def init_note(tags: Mapping[str, str], experiment_id: str | None) -> str:
    """The sentence a fine-tuned run's description gets: its source, linked when in MLflow.

    Args:
        tags: The run's :data:`INIT_TAG` (and :data:`INIT_RUN_TAG`) tags.
        experiment_id: The source run's experiment, for the link (the UI's own route).
    """
    source = tags.get(INIT_TAG, "")
    run = tags.get(INIT_RUN_TAG)
    if not run:
        return f" Started from `{source}`."
    link = f"#/experiments/{experiment_id}/runs/{run}" if experiment_id else ""
    shown = f"[{run[:8]}]({link})" if link else f"`{run[:8]}`"
    return f" Started from `{source}`, trained in run {shown}."


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
        source_type, source = "url", {"uri": mask(origin)}
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

"""MLflow: where runs go, what identifies them, and how stages find the run of a training.

The train stage opens the run (through Lightning's MLFlowLogger) and writes its id to
``paths.run_info``; the evaluate stage reads that file and logs into the same run. The
tracking URI is always passed explicitly, because MLFlowLogger would otherwise fall back to a
``file:`` store that MLflow ≥ 3.13 rejects.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convpipe.config import MlflowParams, Params
from convpipe.errors import ConvpipeError
from convpipe.io import write_json

ENV_URI = "MLFLOW_TRACKING_URI"
CONNECT_TIMEOUT_S = 5.0


def tracking_uri(params: MlflowParams) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri``."""
    return os.environ.get(ENV_URI) or params.tracking_uri


def mask_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (safe to print, log and store)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when an ``http(s)://`` tracking server does not answer.

    MLflow's own client retries for minutes before giving up; a user deserves to know in
    seconds that the server is down.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConvpipeError(
            f"MLflow tracking server unreachable ({exc.strerror or exc})",
            f"at {mask_uri(uri)}",
            f"start it, or set mlflow.tracking_uri / {ENV_URI} to a reachable store",
        ) from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``("section.key", value)`` for every leaf; lists stay whole values."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def params_for_mlflow(params: Params) -> dict[str, str]:
    """Every resolved param as ``{"train.lr": "0.003", ...}``, URIs masked."""
    out = {}
    for key, value in flatten(params.model_dump(mode="json")):
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = mask_uri(text) if "uri" in key else text
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def dvc_lock_hashes(lock: str | Path = "dvc.lock", stages: tuple[str, ...] = ()) -> dict[str, str]:
    """``{"dvc.<stage>.<out path>": md5}`` for the outputs recorded in ``dvc.lock``."""
    from ruamel.yaml import YAML

    path = Path(lock)
    if not path.exists():
        return {}
    data = YAML(typ="safe", pure=True).load(path) or {}
    tags = {}
    for stage, entry in (data.get("stages") or {}).items():
        if stages and stage not in stages:
            continue
        for out in entry.get("outs") or []:
            tags[f"dvc.{stage}.{out['path']}"] = str(out.get("md5", ""))
    return tags


def run_tags(input_stages: tuple[str, ...]) -> dict[str, str]:
    """Tags identifying a run's code and data: git commit, dirty flag, dvc.lock hashes."""
    tags = dvc_lock_hashes(stages=input_stages)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags["git.commit"] = commit or "unknown"
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    return tags


@dataclass(frozen=True)
class RunInfo:
    """Which MLflow run a training wrote to; saved beside the model for later stages."""

    run_id: str
    experiment_id: str
    tracking_uri: str  # masked: never holds a password

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(path, self.__dict__)

    @classmethod
    def load(cls, path: str | Path) -> RunInfo:
        """Read the file the train stage wrote."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise ConvpipeError(
                "no MLflow run recorded", f"in {path}", "run `dvc repro train` first"
            ) from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConvpipeError(
                f"unreadable run record ({exc})", f"in {path}", "rerun `dvc repro train`"
            ) from None

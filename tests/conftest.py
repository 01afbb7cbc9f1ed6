"""Shared fixtures: the repo root, params loaded from the shipped params.yaml."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from convpipe.config.edit import set_dotted
from convpipe.config.schema import Params, parse_params, read_yaml
from tests.project import ROOT

#: One small conv block (4 filters, same padding, batch norm, 2x2 max pooling): fast tests.
TINY_CONV = [
    {
        "filters": 4,
        "kernel": 3,
        "stride": 1,
        "padding": "same",
        "activation": "relu",
        "batch_norm": True,
        "pool": "max",
        "pool_size": 2,
    }
]


def model_section(
    conv: list[dict[str, Any]], hidden: list[int], dropout: float, **more: Any
) -> dict[str, Any]:
    """The shipped ``model:`` section with another network: its other keys stay as shipped."""
    return {
        **read_yaml(ROOT / "params.yaml")["model"],
        "conv": conv,
        "hidden": hidden,
        "dropout": dropout,
        **more,
    }


def residual_stage(filters: int, blocks: int = 1, stride: int = 2, **more: Any) -> dict[str, Any]:
    """One ``model.stages`` entry: basic blocks with ReLU unless ``more`` says otherwise."""
    stage = {"block": "basic", "filters": filters, "blocks": blocks, "stride": stride}
    return {**stage, "activation": "relu", **more}


#: A tiny residual network: TINY_CONV's stem, two basic stages (the second downsamples with a
#: projection shortcut), global average pooling: fast tests of everything a ResNet goes through.
TINY_RESIDUAL = model_section(
    TINY_CONV,
    [],
    0.0,
    stages=[residual_stage(4, stride=1), residual_stage(8, stride=2)],
    global_pool="avg",
)


@pytest.fixture(scope="session")
def raw_params() -> dict[str, Any]:
    """The shipped params.yaml as a plain dict (copy it before changing it)."""
    return read_yaml(ROOT / "params.yaml")


@pytest.fixture
def make_params(raw_params: dict[str, Any]):
    """Build Params from the shipped file with dotted-key overrides: make_params(**{"a.b": 1})."""

    def build(overrides: dict[str, Any] | None = None, **kw: Any) -> Params:
        raw = copy.deepcopy(raw_params)
        for key, value in {**(overrides or {}), **kw}.items():
            set_dotted(raw, key, value)
        return parse_params(raw)

    return build


def fp32(train: Any) -> Any:
    """A ``train`` section with ``precision: 32-true``: what build_trainer takes resolved."""
    return train.model_copy(update={"precision": "32-true"})


def quiet_trainer(root: str | Path, **options: Any) -> L.Trainer:
    """A Trainer for making test checkpoints: no logger, checkpointing, progress bar or summary."""
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **options,
    )


def wait_for_http(proc: subprocess.Popen, url: str, log: Path, seconds: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer on {url} within {seconds} s:\n{log.read_text()}")
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mlflow_server(
    root: Path,
    port: int,
    log: Path,
    app: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``root``'s sqlite store.

    Artifacts are proxied into ``root/artifacts``; the server runs in its own process group
    (stop it with ``os.killpg``) and is answering when this returns. ``app`` names an MLflow
    server app (``basic-auth``), configured through ``env``.
    """
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *(["--app-name", app] if app else []),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(proc, f"http://127.0.0.1:{port}/health", log, 120)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own group
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``convpipe *argv`` in-process: (exit code, stdout, stderr)."""
    from convpipe.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err

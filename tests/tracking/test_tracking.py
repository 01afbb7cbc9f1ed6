"""tracking.py: params flattening (masked), dvc.lock/git tags, run records, reachability."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from convpipe.config.edit import leaves as flatten
from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.tracking.params import log_params, masked_params, params_for_mlflow
from convpipe.tracking.provenance import (
    RunInfo,
    dataset_inputs,
    dvc_lock_hashes,
    run_name,
    run_tags,
    training_note,
)
from convpipe.tracking.runs import system_metrics
from convpipe.tracking.store import (
    ENV_URI,
    artifact_location,
    check_reachable,
    mark_model_training,
    tracking_uri,
)

# The shape DVC 3 writes (schema 2.0): deps/params/outs per stage, outs with md5 + size.
DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: python pipelines/prepare.py
    deps:
    - path: pipelines/prepare.py
      hash: md5
      md5: f4b30f4234373732dc6f1bd502c90501
      size: 871
    params:
      params.yaml:
        base.seed: 42
    outs:
    - path: data/prepared
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 1234567
      nfiles: 8
  augment:
    cmd: python pipelines/augment.py
    outs:
    - path: data/augmented
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
      size: 7654321
      nfiles: 4
    - path: reports/augment_preview.png
      hash: md5
      md5: 11111111111111111111111111111111
      size: 2048
  train:
    cmd: python pipelines/train.py
    outs:
    - path: models/model.ckpt
      hash: md5
      md5: 22222222222222222222222222222222
      size: 656336
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- URIs


def test_tracking_uri_env_wins(make_params, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    params = make_params(**{"mlflow.tracking_uri": "sqlite:///from-params.db"})
    monkeypatch.delenv(ENV_URI, raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    local = f"sqlite:///{tmp_path.resolve()}/from-params.db"
    assert tracking_uri(params.mlflow) == local
    monkeypatch.setenv(ENV_URI, "http://127.0.0.1:5999")
    assert tracking_uri(params.mlflow) == "http://127.0.0.1:5999"
    monkeypatch.setenv(ENV_URI, "")  # empty counts as unset
    assert tracking_uri(params.mlflow) == local


def test_relative_sqlite_store_lives_in_the_dvc_project(make_params, monkeypatch, tmp_path):
    # queued `dvc exp run` experiments run in a temporary copy; DVC_ROOT names the project
    params = make_params(**{"mlflow.tracking_uri": "sqlite:///mlflow.db"})
    monkeypatch.delenv(ENV_URI, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(params.mlflow) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    expected = (tmp_path.resolve() / "mlruns").as_uri()
    assert artifact_location(tracking_uri(params.mlflow)) == expected
    absolute = make_params(**{"mlflow.tracking_uri": "sqlite:////srv/runs.db"})
    assert tracking_uri(absolute.mlflow) == "sqlite:////srv/runs.db"
    assert artifact_location("http://127.0.0.1:5000") is None


# --------------------------------------------------------------------------- params


def test_params_for_mlflow_has_every_leaf_and_masks_uris(make_params) -> None:
    params: Params = make_params(**{"mlflow.tracking_uri": "postgresql://u:secret@db:5432/ml"})
    flat = params_for_mlflow(params)
    leaves = dict(flatten(params.model_dump(mode="json")))
    assert set(flat) == set(leaves)
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["train.lr"] == str(params.train.lr)
    assert flat["model.dropout"] == str(params.model.dropout)
    assert flat["data.source"] == "digits"
    assert flat["data.csv.label_column"] == "0"
    assert flat["mlflow.tracking_uri"] == "postgresql://u:***@db:5432/ml"
    # lists stay whole, as JSON that reads back to the same value
    assert json.loads(flat["model.conv"]) == params.model.model_dump(mode="json")["conv"]
    assert json.loads(flat["model.hidden"]) == list(params.model.hidden)
    assert not any("secret" in v for v in flat.values())


def test_masked_params_is_the_resolved_mapping_without_secrets(make_params) -> None:
    params = make_params(**{"mlflow.tracking_uri": "http://u:secret@h:5000"})
    data = masked_params(params)
    assert data["mlflow"]["tracking_uri"] == "http://u:***@h:5000"
    assert data["train"] == params.train.model_dump(mode="json")
    assert params.mlflow.tracking_uri == "http://u:secret@h:5000"  # the params are untouched


def test_log_params_batches_and_never_truncates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    values = {f"p.{i:03d}": str(i) for i in range(230)}  # > 2 batches of 100
    values["model.conv"] = json.dumps([{"filters": i, "padding": "same"} for i in range(40)])
    assert len(values["model.conv"]) > 1000
    log_params(client, run_id, values)
    assert client.get_run(run_id).data.params == values


# --------------------------------------------------------------------------- tags


def test_dvc_lock_hashes_reads_a_dvc_lock(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(DVC_LOCK, encoding="utf-8")
    assert dvc_lock_hashes(lock, stages=("prepare", "augment")) == {
        "dvc.prepare.data/prepared": "0123456789abcdef0123456789abcdef.dir",
        "dvc.augment.data/augmented": "fedcba9876543210fedcba9876543210.dir",
        "dvc.augment.reports/augment_preview.png": "11111111111111111111111111111111",
    }
    everything = dvc_lock_hashes(lock)
    assert everything["dvc.train.models/model.ckpt"] == "22222222222222222222222222222222"
    assert len(everything) == 4
    # deps and params are not outputs
    assert not any("pipelines/prepare.py" in key for key in everything)


def test_dvc_lock_hashes_missing_empty_and_broken(tmp_path: Path) -> None:
    assert dvc_lock_hashes(tmp_path / "absent.lock") == {}
    empty = tmp_path / "empty.lock"
    empty.write_text("", encoding="utf-8")
    assert dvc_lock_hashes(empty) == {}
    broken = tmp_path / "broken.lock"
    broken.write_text("stages: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConvpipeError, match=r"cannot read dvc.lock") as info:
        dvc_lock_hashes(broken)
    assert "\n" not in info.value.line()


def _git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
    }
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def test_run_tags_name_the_commit_dirty_flag_and_data(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.lock").write_text(DVC_LOCK, encoding="utf-8")
    (repo / "params.yaml").write_text("base: {seed: 1}\n", encoding="utf-8")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    monkeypatch.chdir(repo)
    tags = run_tags(("prepare", "augment"))
    assert tags["git.commit"] == _git(repo, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    assert tags["dvc.prepare.data/prepared"].endswith(".dir")
    assert "dvc.train.models/model.ckpt" not in tags
    (repo / "params.yaml").write_text("base: {seed: 2}\n", encoding="utf-8")
    assert run_tags(())["git.dirty"] == "true"
    (repo / "untracked.txt").write_text("x", encoding="utf-8")
    (repo / "params.yaml").write_text("base: {seed: 1}\n", encoding="utf-8")
    assert run_tags(())["git.dirty"] == "false"  # untracked files do not make it dirty


def test_run_tags_outside_git(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = run_tags(("prepare",))
    assert tags == {
        "git.commit": "unknown",
        "git.dirty": "unknown",
        "convpipe.lock_sha256": "none",  # no requirements.lock in this folder
        "python.version": platform.python_version(),
    }
    assert run_name(tags).startswith("train-nogit-")


def test_under_dvc_exp_run_the_run_is_named_and_tagged_by_the_experiment(
    tmp_path: Path, monkeypatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "baseline")
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-a")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)  # what DVC says wins over HEAD
    tags = run_tags(())
    assert tags["dvc.exp_name"] == "lr-a" and tags["dvc.exp_baseline_rev"] == "f" * 40
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == head
    assert run_name(tags) == "lr-a"
    assert training_note(tags).startswith("DVC experiment `lr-a` on baseline `fffffff`")
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    tags = run_tags(())
    assert (
        "dvc.exp_name" not in tags and training_note(tags) == f"`dvc repro` at commit `{head[:7]}`."
    )


def test_run_names_differ_even_after_identical_seeding() -> None:
    import random

    tags = {"git.commit": "0123456789abcdef"}
    names = set()
    for _ in range(20):
        random.seed(42)  # what seed_everything does before the run is opened
        names.add(run_name(tags))
    assert len(names) == 20
    assert all(re.fullmatch(r"train-0123456-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)


def _manifest(**changes):
    from convpipe.data.manifest import Manifest

    base = {
        "format_version": 1, "stage": "prepare", "source": "imagefolder",
        "class_names": ["cat", "dog"], "num_classes": 2, "channels": 3, "image_size": [4, 6],
        "mean": [0.5] * 3, "std": [0.2] * 3,
        "splits": {s: {"count": n, "per_class": {}, "x": f"{s}_x.npy", "y": f"{s}_y.npy"}
                   for s, n in (("train", 10), ("val", 3), ("test", 2))},
        "skipped": {"count": 0, "report": "skipped_files.csv"},
        "content_hash": "sha256:" + "ab" * 32,
    }  # fmt: skip
    return Manifest.model_validate({**base, **changes})


def test_dataset_inputs_one_per_split_with_the_manifest_hash(tmp_path: Path) -> None:
    prepared = _manifest()
    inputs = dataset_inputs(prepared, None, str(tmp_path))
    names = [(d.dataset.name, d.tags[0].key, d.tags[0].value) for d in inputs]
    assert names == [
        ("imagefolder-train", "mlflow.data.context", "train"),
        ("imagefolder-val", "mlflow.data.context", "val"),
        ("imagefolder-test", "mlflow.data.context", "test"),
    ]
    for item, rows in zip(inputs, (10, 3, 2), strict=True):
        assert item.dataset.digest == "ab" * 8
        assert item.dataset.source_type == "local"
        assert json.loads(item.dataset.source) == {"uri": str(tmp_path.resolve())}
        profile = json.loads(item.dataset.profile)
        assert profile == {
            "num_rows": rows, "num_classes": 2, "image_shape": [4, 6, 3],
            "content_hash": prepared.content_hash,
        }  # fmt: skip
        spec = json.loads(json.loads(item.dataset.schema)["mlflow_tensorspec"]["features"])
        assert spec[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 4, 6, 3]}
    augmented = _manifest(
        stage="augment",
        splits={"train": {"count": 20, "per_class": {}, "x": "train_x.npy", "y": "train_y.npy"}},
        content_hash="sha256:" + "cd" * 32,
    )
    extra = dataset_inputs(prepared, augmented, "https://u:secret@host/data")[-1]
    assert extra.dataset.name == "imagefolder-train-augmented"
    assert extra.dataset.digest == "cd" * 8 and extra.tags[0].value == "train"
    assert json.loads(extra.dataset.source) == {"uri": "https://u:***@host/data"}


def test_mark_model_training_keeps_a_kind_the_user_chose(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    fresh = client.create_experiment("a", artifact_location=(tmp_path / "a").as_uri())
    mark_model_training(client, fresh)
    assert client.get_experiment(fresh).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("b", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "genai_development")
    mark_model_training(client, chosen)
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


# --------------------------------------------------------------------------- run record


def test_run_info_round_trip(tmp_path: Path) -> None:
    info = RunInfo("a" * 32, "7", "http://u:***@h:5000")
    path = tmp_path / "models" / "mlflow_run.json"
    info.save(path)
    assert json.loads(path.read_text()) == {
        "run_id": "a" * 32,
        "experiment_id": "7",
        "tracking_uri": "http://u:***@h:5000",
    }
    assert RunInfo.load(path) == info
    assert [p.name for p in path.parent.iterdir()] == ["mlflow_run.json"]  # no temp files


def test_run_info_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConvpipeError) as info:
        RunInfo.load(tmp_path / "nope.json")
    line = info.value.line()
    assert line.startswith("convpipe: error: no MLflow run recorded")
    assert "nope.json" in line and "dvc repro train" in line


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"run_id": "x"}',
        '{"run_id": "x", "experiment_id": "1", "tracking_uri": "u", "extra": 1}',
        '{"run_id": "", "experiment_id": "1", "tracking_uri": "u"}',
        '{"run_id": 5, "experiment_id": "1", "tracking_uri": "u"}',
    ],
)
def test_run_info_unreadable(tmp_path: Path, content: str) -> None:
    path = tmp_path / "run.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConvpipeError, match="run record"):
        RunInfo.load(path)


# --------------------------------------------------------------------------- reachability


def test_check_reachable_closed_port_fails_fast_without_the_password() -> None:
    uri = f"http://admin:hunter2@127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ConvpipeError) as info:
        check_reachable(uri)
    assert time.monotonic() - start < 5
    line = info.value.line()
    assert "unreachable" in line and "admin:***@127.0.0.1" in line
    assert "hunter2" not in line


def test_check_reachable_accepts_a_listening_server_and_local_stores() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    check_reachable("sqlite:///nowhere/mlflow.db")  # not a server: nothing to check


def test_check_reachable_bad_port() -> None:
    with pytest.raises(ConvpipeError, match="invalid port"):
        check_reachable("http://127.0.0.1:99999999")


# --------------------------------------------------------------------------- system metrics


def _busy(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def test_system_metrics_of_a_run_shorter_than_one_interval_are_kept(tmp_path: Path) -> None:
    """MLflow's monitor publishes after each whole interval and dropped the last one: a
    training shorter than ``runtime.system_metrics_seconds`` had no system metrics."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with system_metrics(run_id, uri, 3600, None, resumed=False):
        _busy(0.3)  # the monitor takes its first sample, then the CPU is in use
    logged = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        logged
    )
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in cpu] == [0]  # one sample, as it stopped
    assert cpu[-1].value > 0  # measured over the busy interval, not psutil's first-call 0.0
    with system_metrics(run_id, uri, 3600, "node1", resumed=True):  # a resumed run goes on
        time.sleep(0.2)
    history = client.get_metric_history(run_id, "system/node1/cpu_utilization_percentage")
    assert [m.step for m in history] == [1]

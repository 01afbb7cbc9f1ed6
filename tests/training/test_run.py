"""train() and evaluate() end to end on real digits, with real MLflow stores (sqlite and server).

Most trainings are one or two epochs of a tiny CNN on ~700 images (well under a second);
those that take longer (the shipped model, pure SGD, the MLflow server) are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from convpipe.config.edit import set_dotted
from convpipe.config.schema import Params, parse_params
from convpipe.data.augment import write_augmented
from convpipe.data.manifest import load_manifest
from convpipe.data.prepare import write_prepared
from convpipe.data.sources import open_source
from convpipe.errors import EXIT_USER_ERROR, ConvpipeError, Preempted, report
from convpipe.evaluation.evaluate import evaluate
from convpipe.evaluation.metrics import mlflow_metrics
from convpipe.models.checkpoint import AtomicCheckpointIO
from convpipe.models.module import CNNClassifier
from convpipe.models.shapes import layer_shapes
from convpipe.tracking.params import masked_params, params_for_mlflow
from convpipe.tracking.provenance import RunInfo
from convpipe.tracking.runs import INTERRUPTED_TAG, RunLogger, failed_run_on_error, start_run
from convpipe.tracking.store import ENV_URI
from convpipe.training.callbacks import HISTORY_COLUMNS, EpochHistory
from convpipe.training.cost import PER_EPOCH
from convpipe.training.resume import fingerprint
from convpipe.training.run import TrainResult, build_datamodule, train
from convpipe.training.trainer import build_trainer, check_monitor
from tests.helpers.models import TINY_CONV, fp32
from tests.helpers.project import ROOT, make_project
from tests.helpers.servers import free_port, start_mlflow_server, stop_server

SMALL_MODEL = {
    "model.conv": TINY_CONV,
    "model.hidden": [16],
    "model.dropout": 0.0,
}
DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: python pipelines/prepare.py
    outs:
    - path: data/prepared
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 1000
      nfiles: 8
  augment:
    cmd: python pipelines/augment.py
    outs:
    - path: data/augmented
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
      size: 2000
      nfiles: 4
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"  # absent from a user's clone
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
}


# --------------------------------------------------------------------------- helpers


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw


def prepare_data(raw_params: dict[str, Any], root: Path, **overrides: Any) -> Params:
    """Prepare and augment the digits into ``root`` (paths absolute)."""
    raw = with_overrides(raw_params, overrides)
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    params = parse_params(raw)
    write_prepared(open_source(params.data), params.data, params.base.seed, params.paths.prepared)
    write_augmented(params)
    return params


def run_params(
    data: Params, out: Path, uri: str, create_experiment: bool = True, **overrides: Any
) -> Params:
    """Params reading ``data``'s prepared/augmented folders and writing everything under ``out``.

    For a sqlite ``uri`` the experiment is created first, its artifacts under ``out``, unless
    ``create_experiment`` is false (for stores the test expects never to be touched).
    """
    raw = with_overrides(data.model_dump(mode="json"), overrides)
    data_root = Path(data.paths.prepared).parents[1]  # <root>/data/prepared
    raw["paths"] = {
        key: str(out / Path(value).relative_to(data_root)) for key, value in raw["paths"].items()
    }
    raw["paths"].update(prepared=data.paths.prepared, augmented=data.paths.augmented)
    raw["mlflow"]["tracking_uri"] = uri
    params = parse_params(raw)
    if uri.startswith("sqlite:") and create_experiment:
        experiment(uri, params.mlflow.experiment, out)
    return params


def experiment(uri: str, name: str, root: Path) -> None:
    """Create experiment ``name`` with its artifacts under ``root`` unless it exists.

    MLflow caches one store per URI, whose default artifact root is ``./mlruns`` of the cwd
    at its first use: without an explicit location, artifacts could land in the repo.
    """
    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())


def history(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, folder):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def train_size(params: Params) -> int:
    """m: the prepared train split plus its augmented copies."""
    counts = [
        load_manifest(p).splits["train"].count
        for p in (params.paths.prepared, params.paths.augmented)
    ]
    return sum(counts)


def load_ckpt(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def inside(folder: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run with ``folder`` as cwd (MLflow artifacts, dvc.lock and git are cwd-relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv(ENV_URI, raising=False)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        yield


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits(raw_params, tmp_path_factory) -> Params:
    """The shipped data settings: digits 70/15/15 plus one augmented copy."""
    return prepare_data(raw_params, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def small(raw_params, tmp_path_factory) -> Params:
    """A smaller train split (20 %, ~360 images, plus one augmented copy) for quick runs."""
    return prepare_data(
        raw_params,
        tmp_path_factory.mktemp("small"),
        **{"data.val_fraction": 0.4, "data.test_fraction": 0.4},
    )


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store per module (creating its tables takes a second or two)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@dataclass
class Trained:
    params: Params
    result: TrainResult
    eval_metrics: dict[str, Any]
    client: MlflowClient
    root: Path


@pytest.fixture(scope="module")
def trained(digits: Params, sqlite_uri: str, tmp_path_factory) -> Trained:
    """The shipped model, 3 epochs, then evaluate; run from a git repo with a dvc.lock."""
    root = tmp_path_factory.mktemp("trained")
    (root / "dvc.lock").write_text(DVC_LOCK, encoding="utf-8")
    for args in (["init", "-q"], ["add", "dvc.lock"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=root, env={**os.environ, **GIT_ENV}, check=True)
    params = run_params(
        digits,
        root,
        sqlite_uri,
        **{
            "train.max_epochs": 3,
            "mlflow.experiment": "trained",
            "runtime.system_metrics_seconds": 1,  # a sample a second: a short training has some
        },
    )
    with inside(root):
        result = train(params)
        metrics = evaluate(params)
    client = MlflowClient(sqlite_uri)
    artifacts = Path(client.get_run(result.run.run_id).info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(root), artifacts
    return Trained(params, result, metrics, client, root)


# --------------------------------------------------------------------------- unit


def test_check_monitor_suggests_the_closest_metric(make_params) -> None:
    check_monitor(make_params(**{"train.monitor": "train/penalty"}).train)
    with pytest.raises(ConvpipeError) as info:
        check_monitor(make_params(**{"train.monitor": "val/los"}).train)
    line = info.value.line()
    assert "'val/los', a metric the model does not log" in line
    assert "did you mean 'val/loss'?" in line


def test_history_csv_header_and_rows() -> None:
    hist = EpochHistory()
    hist.rows = [{"epoch": 0.0, "train/loss": 0.5, "val/loss": 0.25, "lr": 0.1}]
    lines = hist.to_csv().splitlines()
    assert lines[0] == ",".join(HISTORY_COLUMNS)
    assert lines[1] == "0,0.5,,,0.25,,0.1"


def _learning(callbacks: list[Any]) -> list[tuple[str, Any]]:
    """What in a callback list changes what is learnt: its kinds, in order, with settings."""
    from lightning.pytorch.callbacks import EarlyStopping

    from convpipe.training.callbacks import EMAWeights, FreezeBackbone

    kinds = (FreezeBackbone, EMAWeights, EarlyStopping)
    return [
        (type(c).__name__, getattr(c, "monitor", None), getattr(c, "patience", None))
        for c in callbacks
        if isinstance(c, kinds)
    ]


def test_a_tuning_trial_learns_with_the_train_stage_callbacks(make_params, tmp_path) -> None:
    """Fine-tuning's freeze, the weight average and early stopping: the same in both."""
    from convpipe.training.trainer import training_callbacks, trial_callbacks

    train = make_params(
        **{
            "train.freeze_epochs": 2,
            "model.init_from": "models/base.ckpt",
            "train.ema_decay": 0.99,
            "train.patience": 3,
        }
    ).train
    *_, stage = training_callbacks(train, str(tmp_path))
    marker = object()
    history, trial = trial_callbacks(train, marker)  # type: ignore[arg-type]
    assert _learning(trial) == _learning(stage)
    assert [name for name, *_ in _learning(trial)] == [
        "FreezeBackbone",
        "EMAWeights",
        "EarlyStopping",
    ]
    assert ("EarlyStopping", train.monitor, 3) in _learning(trial)
    assert trial.index(marker) > 1 and history in trial  # the search's own after the average
    assert not [c for c in trial if "Checkpoint" in type(c).__name__]


def test_build_trainer_unsupported_accelerator(make_params) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = make_params(**{"train.accelerator": "cuda"})
    with pytest.raises(ConvpipeError, match="cannot build the Trainer") as info:
        build_trainer(fp32(params.train), [], False, "unused", interactive=False)
    assert "train.accelerator" in info.value.line()


def test_build_trainer_options_override_the_params(make_params, tmp_path: Path) -> None:
    params = make_params(**{"train.max_epochs": 7})
    built = build_trainer(fp32(params.train), [], False, str(tmp_path), interactive=False)
    assert built.max_epochs == 7 and built.limit_val_batches == 1.0
    options = {"max_epochs": 1, "limit_val_batches": 0}
    built = build_trainer(
        fp32(params.train), [], False, str(tmp_path), interactive=False, **options
    )
    assert built.max_epochs == 1 and built.limit_val_batches == 0


def test_failed_run_on_error_never_leaves_a_run_running(
    make_params, sqlite_uri: str, tmp_path: Path
) -> None:
    params = make_params(**{"mlflow.experiment": "guard"})
    experiment(sqlite_uri, "guard", tmp_path)
    client = MlflowClient(sqlite_uri)
    with inside(tmp_path):
        cases: list[tuple[BaseException, type[BaseException], str]] = [
            (RuntimeError("boom"), RuntimeError, "FAILED"),
            (KeyboardInterrupt(), KeyboardInterrupt, "KILLED"),
            (SystemExit(1), KeyboardInterrupt, "KILLED"),  # Lightning's exit on Ctrl+C
            (Preempted("stopped", "at epoch 3", "rerun", 15), Preempted, "KILLED"),
        ]
        for error, raised, status in cases:
            logger = start_run(params, sqlite_uri)
            assert client.get_run(str(logger.run_id)).info.status == "RUNNING"
            with pytest.raises(raised), failed_run_on_error(logger):
                raise error
            assert client.get_run(str(logger.run_id)).info.status == status
    assert isinstance(logger, RunLogger)
    tags = client.get_run(str(logger.run_id)).data.tags
    assert tags[INTERRUPTED_TAG] == "stopped; at epoch 3"  # where a preemption left it


def test_a_preemption_exits_as_the_signal_would_in_one_line(capsys) -> None:
    assert report(Preempted("stopped by SIGTERM", "saved in last.ckpt", "rerun", 15)) == 143
    assert report(Preempted("stopped by SIGUSR1", "saved in last.ckpt", "rerun", 10)) == 138
    assert report(KeyboardInterrupt()) == 130
    assert report(ConvpipeError("bad")) == EXIT_USER_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "convpipe: error: stopped by SIGTERM, saved in last.ckpt, rerun"


def test_a_runtime_knob_never_blocks_a_resume(make_params) -> None:
    shipped = fingerprint(make_params(), "content", 100)
    other_machine = {"runtime.threads": 1, "runtime.num_workers": 2, "runtime.compile": True}
    assert fingerprint(make_params(**other_machine), "content", 100) == shipped
    assert fingerprint(make_params(**{"train.lr": 0.1}), "content", 100) != shipped


def test_checkpoints_are_written_whole_or_not_at_all(make_params, tmp_path: Path) -> None:
    trainer = build_trainer(fp32(make_params().train), [], False, str(tmp_path), interactive=False)
    writer = trainer.strategy.checkpoint_io
    assert isinstance(writer, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    writer.save_checkpoint({"epoch": 3, "w": torch.ones(4)}, path)
    with pytest.raises(Exception, match="pickle"):  # fails part-way through the write
        writer.save_checkpoint({"epoch": 4, "w": torch.zeros(4), "bad": lambda: 0}, path)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 3 and torch.equal(kept["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_start_run_with_an_unusable_store(make_params, tmp_path: Path) -> None:
    with inside(tmp_path), pytest.raises(ConvpipeError) as info:
        start_run(make_params(), "file:./mlruns")
    assert info.value.line().startswith("convpipe: error: MLflow failed while opening a run")
    assert "\n" not in info.value.line()


def test_unreachable_server_fails_fast(small: Params, tmp_path: Path) -> None:
    uri = f"http://user:pw123@127.0.0.1:{free_port()}"
    unused = tmp_path / "unused.db"
    params = run_params(small, tmp_path, f"sqlite:///{unused}", create_experiment=False)
    with inside(tmp_path, env={ENV_URI: uri}):
        start = time.monotonic()
        with pytest.raises(ConvpipeError, match="unreachable") as info:
            train(params)
        assert time.monotonic() - start < 5
        assert "pw123" not in info.value.line()
        assert not Path(params.paths.model).exists()
        assert not Path(params.paths.run_info).exists()
        # evaluate of a recorded run: the same, before computing anything
        RunInfo("a" * 32, "1", uri).save(params.paths.run_info)
        start = time.monotonic()
        with pytest.raises(ConvpipeError, match="unreachable"):
            evaluate(params)
        assert time.monotonic() - start < 5
        assert not Path(params.paths.eval_metrics).exists()
    assert not unused.exists()  # $MLFLOW_TRACKING_URI won: the params' store was never opened


# --------------------------------------------------------------------------- outputs


COST_KEYS = (
    "cost/train_seconds",
    "cost/train_images",
    "cost/images_per_s",
    "cost/train_tflops",
    "cost/gflops_per_s",
    "cost/precision",
)


@pytest.mark.slow
def test_train_json_and_the_run_put_what_training_cost_beside_accuracy(trained: Trained) -> None:
    """dvc exp show and MLflow's runs table get the cost columns; MLflow gets them per epoch,
    and the machine's load (system metrics) while it trained."""
    metrics, run_id = trained.result.metrics, trained.result.run.run_id
    with inside(trained.root):
        datamodule = build_datamodule(trained.params)
    assert metrics["cost/train_images"] == 3 * datamodule.train_size  # every image, each epoch
    assert metrics["cost/precision"] in ("32-true", "bf16-mixed")
    assert metrics["cost/train_seconds"] > 0 and metrics["cost/images_per_s"] == pytest.approx(
        metrics["cost/train_images"] / metrics["cost/train_seconds"], rel=1e-3
    )
    model = CNNClassifier.load_from_checkpoint(trained.params.paths.model, weights_only=True)
    forward = sum(r.flops for r in layer_shapes(model.model_params, 1, (8, 8), 10))
    per_image = metrics["cost/train_tflops"] * 1e12 / metrics["cost/train_images"]
    assert 2.0 * forward < per_image < 4.0 * forward  # backward is about twice the forward
    logged = trained.client.get_run(run_id).data.metrics
    for key in COST_KEYS[:-1]:
        assert logged[key] == pytest.approx(metrics[key])
    for key in PER_EPOCH:
        steps = [m.step for m in trained.client.get_metric_history(run_id, key)]
        assert steps == [0, 1, 2], key  # one value per epoch, the epoch its step
    # MLflow's system metrics, sampled while it trained
    system = {key for key in logged if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


@pytest.mark.slow
def test_outputs_checkpoints_and_history(trained: Trained) -> None:
    paths, metrics = trained.params.paths, trained.result.metrics
    epochs = metrics["epochs"]
    assert epochs == 3 and metrics["stopped_early"] is False
    assert json.loads(Path(paths.train_metrics).read_text()) == metrics
    keys = {"epochs", "stopped_early", "monitor", "best", "test/loss", "test/acc", "test/count"}
    assert set(metrics) == keys | set(COST_KEYS) | {"mlflow_run_id"}
    assert metrics["mlflow_run_id"] == trained.result.run.run_id  # DVC side finds the run
    assert metrics["test/count"] == 269  # every test image counted once
    rows = history(paths.train_history)
    assert len(rows) == epochs
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert all(math.isfinite(float(r[c])) for r in rows for c in HISTORY_COLUMNS)
    # checkpoints: best by val/loss, last of the final epoch; the model file is the best
    best = Path(paths.checkpoints) / "best.ckpt"
    last = Path(paths.checkpoints) / "last.ckpt"
    assert sorted(p.name for p in Path(paths.checkpoints).iterdir()) == ["best.ckpt", "last.ckpt"]
    assert Path(paths.model).read_bytes() == best.read_bytes()
    val_losses = [float(r["val/loss"]) for r in rows]
    assert load_ckpt(best)["epoch"] == val_losses.index(min(val_losses))
    assert metrics["best"] == pytest.approx(min(val_losses), rel=1e-6)
    assert load_ckpt(last)["epoch"] == epochs - 1
    assert trained.result.best_checkpoint == paths.model
    assert RunInfo.load(paths.run_info) == trained.result.run


@pytest.mark.slow
def test_train_time_test_metrics_equal_evaluate(trained: Trained) -> None:
    train_metrics = json.loads(Path(trained.params.paths.train_metrics).read_text())
    eval_metrics = json.loads(Path(trained.params.paths.eval_metrics).read_text())
    # JSON floats round-trip exactly; per-class detail is a plot, not a dvc exp show column
    assert eval_metrics == {k: v for k, v in trained.eval_metrics.items() if k != "per_class"}
    assert next(iter(eval_metrics)) == "accuracy"  # the headline leads dvc exp show
    per_class = history(trained.params.paths.eval_per_class)
    assert [r["class"] for r in per_class] == list(trained.eval_metrics["per_class"])
    for row in per_class:
        expected = trained.eval_metrics["per_class"][row["class"]]
        assert float(row["f1"]) == expected["f1"] and int(row["support"]) == expected["support"]
    assert abs(train_metrics["test/acc"] - eval_metrics["accuracy"]) < 1e-6
    assert abs(train_metrics["test/loss"] - eval_metrics["loss"]) < 1e-6
    test_count = load_manifest(trained.params.paths.prepared).splits["test"].count
    assert eval_metrics["count"] == test_count and eval_metrics["accuracy"] > 0.8
    rows = history(trained.params.paths.eval_confusion)
    assert len(rows) == eval_metrics["count"]
    right = sum(r["actual"] == r["predicted"] for r in rows)
    assert right / len(rows) == pytest.approx(eval_metrics["accuracy"])
    for name in ("confusion_png", "misclassified_png", "curves_png"):
        assert Path(getattr(trained.params.paths, name)).read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- MLflow content


@pytest.mark.slow
def test_one_finished_run_with_every_param(trained: Trained) -> None:
    client, run_id = trained.client, trained.result.run.run_id
    experiment = client.get_experiment_by_name("trained")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert trained.result.run.experiment_id == experiment.experiment_id
    params = run.data.params
    resolved = params_for_mlflow(trained.params)
    assert {k: v for k, v in params.items() if not k.startswith("derived.")} == resolved
    assert params["train.lr"] == "0.003" and params["model.dropout"] == "0.25"
    assert params["data.source"] == "digits"
    assert json.loads(params["model.conv"]) == trained.params.model.model_dump()["conv"]
    assert params["derived.train_size"] == str(train_size(trained.params))
    assert params["derived.num_classes"] == "10"
    assert params["derived.tracking_uri"] == trained.params.mlflow.tracking_uri
    assert params["derived.precision"] in ("32-true", "bf16-mixed")  # what auto chose here
    # Lightning's own hparams are not logged again under other names (train/lr, model/conv/0/...)
    assert not [key for key in params if "/" in key or key in ("num_classes", "class_names")]


@pytest.mark.slow
def test_metric_histories_one_value_per_epoch(trained: Trained) -> None:
    client, run_id = trained.client, trained.result.run.run_id
    rows = history(trained.params.paths.train_history)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        values = client.get_metric_history(run_id, key)
        assert len(values) == len(rows), key
        steps = [m.step for m in values]
        assert steps == [int(r["epoch"]) for r in rows]  # MLflow's step is the epoch
        assert [m.value for m in values] == pytest.approx([float(r[key]) for r in rows])
    lr = client.get_metric_history(run_id, "lr-Adam")
    assert [m.step for m in lr] == [int(r["epoch"]) for r in rows]
    test_acc = client.get_metric_history(run_id, "test/acc")
    assert len(test_acc) == 1
    assert test_acc[0].value == pytest.approx(trained.result.metrics["test/acc"])


@pytest.mark.slow
def test_tags_name_the_code_and_data(trained: Trained) -> None:
    tags = trained.client.get_run(trained.result.run.run_id).data.tags
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=trained.root, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["git.commit"] == head
    assert tags["git.dirty"] == "false"  # outputs are untracked files
    assert tags["dvc.prepare.data/prepared"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["dvc.augment.data/augmented"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["mlflow.source.git.commit"] == head  # the UI's "Version" column
    assert "dvc.exp_name" not in tags  # not under `dvc exp run`
    assert tags["convpipe.lock_sha256"] == "none"  # this project copy has no requirements.lock
    assert tags["python.version"] == platform.python_version()
    run = trained.client.get_run(trained.result.run.run_id)
    assert run.info.run_name.startswith(f"train-{head[:7]}-")
    assert tags["mlflow.note.content"] == f"`dvc repro` at commit `{head[:7]}`."
    experiment = trained.client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_the_run_logs_its_datasets(trained: Trained) -> None:
    run = trained.client.get_run(trained.result.run.run_id)
    prepared = load_manifest(trained.params.paths.prepared)
    augmented = load_manifest(trained.params.paths.augmented)
    logged = {
        d.dataset.name: (d.dataset, {t.key: t.value for t in d.tags})
        for d in run.inputs.dataset_inputs
    }
    assert set(logged) == {"digits-train", "digits-val", "digits-test", "digits-train-augmented"}
    for split in ("train", "val", "test"):
        dataset, tags = logged[f"digits-{split}"]
        assert tags == {"mlflow.data.context": split}
        assert dataset.digest == prepared.content_hash.removeprefix("sha256:")[:16]
        assert json.loads(dataset.profile)["num_rows"] == prepared.splits[split].count
        assert dataset.source_type == "code"
        assert json.loads(dataset.source) == {"tags": {"loader": "sklearn.datasets.load_digits"}}
    dataset, tags = logged["digits-train-augmented"]
    assert tags == {"mlflow.data.context": "train"}
    assert dataset.digest == augmented.content_hash.removeprefix("sha256:")[:16]
    assert augmented.content_hash != prepared.content_hash  # its own arrays, its own identity
    assert json.loads(dataset.profile)["num_rows"] == augmented.splits["train"].count


@pytest.mark.slow
def test_artifacts_of_train_and_evaluate(trained: Trained, tmp_path: Path) -> None:
    client, run_id, paths = trained.client, trained.result.run.run_id, trained.params.paths
    assert artifact_paths(client, run_id) == {
        "params.yaml",
        "environment/pip-freeze.txt",
        "data/manifest.json",
        "data/augmented/manifest.json",
        "data/augmented/pipeline.json",
        "model/model.ckpt",
        "plots/history.csv",
        "evaluation/confusion_matrix.png",
        "evaluation/misclassified.png",
        "evaluation/curves.png",
        "evaluation/reliability.png",
        "evaluation/roc_pr.png",
        "evaluation/gradcam.png",
        "evaluation/eval.json",
        "evaluation/per_class.csv",
        "evaluation/calibration.csv",
        "evaluation/roc.csv",
        "evaluation/pr.csv",
        f"promotion/{trained.params.mlflow.registered_model}-v1/test_correct.npy",
    }
    model = client.download_artifacts(run_id, "model/model.ckpt", str(tmp_path))
    assert Path(model).read_bytes() == Path(paths.model).read_bytes()
    logged = YAML(typ="safe").load(Path(client.download_artifacts(run_id, "params.yaml")))
    assert logged == masked_params(trained.params)
    manifest = client.download_artifacts(run_id, "data/manifest.json", str(tmp_path))
    assert Path(manifest).read_bytes() == (Path(paths.prepared) / "manifest.json").read_bytes()
    png = client.download_artifacts(run_id, "evaluation/curves.png", str(tmp_path))
    assert Path(png).read_bytes() == Path(paths.curves_png).read_bytes()
    frozen = Path(client.download_artifacts(run_id, "environment/pip-freeze.txt", str(tmp_path)))
    assert f"lightning=={importlib.metadata.version('lightning')}" in frozen.read_text().split()


@pytest.mark.slow
def test_evaluate_metrics_are_in_the_training_run(trained: Trained) -> None:
    logged = trained.client.get_run(trained.result.run.run_id).data.metrics
    ev = trained.eval_metrics
    assert logged["test/accuracy"] == pytest.approx(ev["accuracy"])
    assert logged["test/f1_macro"] == pytest.approx(ev["f1_macro"])
    assert logged["test/top3_accuracy"] == pytest.approx(ev["top3_accuracy"])
    assert logged["test/count"] == ev["count"]
    for name, row in ev["per_class"].items():
        assert logged[f"test/recall/{name}"] == pytest.approx(row["recall"])
    # the registered model carries its test metrics (and only those) on its MLflow page
    run = trained.client.get_run(trained.result.run.run_id)
    (output,) = run.outputs.model_outputs
    model = trained.client.get_logged_model(output.model_id)
    linked = {m.key: m.value for m in model.metrics}
    assert linked["test/accuracy"] == pytest.approx(ev["accuracy"])
    assert set(linked) == set(mlflow_metrics(ev))  # evaluate's; not train's test/acc


# --------------------------------------------------------------------------- behaviour


def test_early_stopping_stops(small: Params, sqlite_uri: str, tmp_path: Path) -> None:
    # with no regularisation train/penalty is exactly 0 every epoch: it can never improve
    params = run_params(
        small,
        tmp_path,
        sqlite_uri,
        **SMALL_MODEL,
        **{
            "train.max_epochs": 5,
            "train.patience": 1,
            "train.reg_type": "none",
            "train.monitor": "train/penalty",
            "train.monitor_mode": "min",  # a constant 0 never improves either way
            "mlflow.experiment": "early",
        },
    )
    with inside(tmp_path):
        metrics = train(params).metrics
    assert metrics["stopped_early"] is True
    assert metrics["epochs"] == 2 < params.train.max_epochs  # epoch 0 sets the best, 1 waits
    assert metrics["best"] == 0.0
    assert len(history(params.paths.train_history)) == 2
    checkpoints = Path(params.paths.checkpoints)
    assert load_ckpt(checkpoints / "best.ckpt")["epoch"] == 0
    assert load_ckpt(checkpoints / "last.ckpt")["epoch"] == 1  # last is the last epoch
    assert Path(params.paths.model).read_bytes() == (checkpoints / "best.ckpt").read_bytes()
    run_id = RunInfo.load(params.paths.run_info).run_id
    assert len(MlflowClient(sqlite_uri).get_metric_history(run_id, "val/loss")) == 2


def test_divergence_fails_the_run_and_writes_no_model(
    small: Params, sqlite_uri: str, tmp_path: Path
) -> None:
    params = run_params(
        small,
        tmp_path,
        sqlite_uri,
        **{"train.optimizer": "sgd", "train.lr": 1e6, "mlflow.experiment": "diverge"},
    )
    with inside(tmp_path), pytest.raises(ConvpipeError) as info:
        train(params)
    line = info.value.line()
    assert (
        line.startswith("convpipe: error: training diverged: loss became")
        and "lower train.lr" in line
    )
    assert "last finite loss" in line and "epoch 0" in line
    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("diverge")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    for name in ("model", "run_info", "train_metrics", "train_history"):
        assert not Path(getattr(params.paths, name)).exists(), name


@pytest.mark.parametrize(
    ("optimizer", "batch_size"),
    [
        ("sgd", 64),
        ("momentum", 64),
        ("nesterov", 64),
        ("adam", 64),
        ("adamw", 64),
        ("adam", "full"),
        pytest.param("sgd", 1, marks=pytest.mark.slow),  # ~700 steps and 1-image val batches
    ],
)
def test_every_optimizer_and_batch_mode_trains(
    small: Params, sqlite_uri: str, tmp_path: Path, optimizer: str, batch_size: int | str
) -> None:
    params = run_params(
        small,
        tmp_path,
        sqlite_uri,
        **SMALL_MODEL,
        **{
            "train.optimizer": optimizer,
            "train.batch_size": batch_size,
            "train.lr": 0.01,
            "train.max_epochs": 1,
            "mlflow.experiment": "matrix",
        },
    )
    with inside(tmp_path):
        result = train(params)
    m = train_size(small)
    assert result.metrics["epochs"] == 1 and math.isfinite(result.metrics["test/loss"])
    assert len(history(params.paths.train_history)) == 1
    last = load_ckpt(Path(params.paths.checkpoints) / "last.ckpt")
    per_epoch = 1 if batch_size == "full" else math.ceil(m / int(batch_size))
    assert last["global_step"] == per_epoch  # one optimiser step per batch
    group = last["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 0.01
    if optimizer in ("momentum", "nesterov"):
        assert group["momentum"] == 0.9 and group["nesterov"] == (optimizer == "nesterov")
    if optimizer == "adamw":
        assert group["weight_decay"] == 0.0  # the lambda/m penalty is the only regulariser
    run = MlflowClient(sqlite_uri).get_run(result.run.run_id)
    assert run.info.status == "FINISHED"
    expected = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adam": "Adam"}
    assert f"lr-{expected.get(optimizer, 'AdamW')}" in run.data.metrics


@pytest.mark.parametrize("scheduler", ["onecycle", "step"])
def test_the_learning_rate_is_logged_per_epoch_whatever_the_scheduler(
    small: Params, sqlite_uri: str, tmp_path: Path, scheduler: str
) -> None:
    params = run_params(
        small,
        tmp_path,
        sqlite_uri,
        **SMALL_MODEL,
        **{"train.scheduler": scheduler, "train.max_epochs": 2, "mlflow.experiment": "lr"},
    )
    with inside(tmp_path):
        result = train(params)
    client = MlflowClient(sqlite_uri)
    logged = client.get_metric_history(result.run.run_id, "lr-Adam")
    assert [m.step for m in logged] == [0, 1]  # the epoch, like every other metric
    # logged at each epoch's start: epoch 1 starts where epoch 0's history row ended
    rows = history(params.paths.train_history)
    assert logged[1].value == pytest.approx(float(rows[0]["lr"]))


def test_training_is_reproducible(small: Params, sqlite_uri: str, tmp_path: Path) -> None:
    outputs = []
    for name in ("one", "two"):
        params = run_params(
            small,
            tmp_path / name,
            sqlite_uri,
            **SMALL_MODEL,
            # precision pinned: "auto" times bf16 against fp32 on this machine, and a busy
            # machine may time them otherwise between the two runs (a measured choice)
            **{
                "train.max_epochs": 2,
                "train.precision": "32-true",
                "augment.online": True,
                "mlflow.experiment": "repro",
            },
        )
        with inside(tmp_path / name):
            train(params)
        state = load_ckpt(params.paths.model)["state_dict"]
        outputs.append((Path(params.paths.train_history).read_text(), state))
    assert outputs[0][0] == outputs[1][0]
    for key, value in outputs[0][1].items():
        assert torch.equal(value, outputs[1][1][key]), key


# --------------------------------------------------------------------------- MLflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A real ``mlflow server`` on 127.0.0.1, its own sqlite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = start_mlflow_server(root, port, root / "server.log")
    try:
        yield f"http://127.0.0.1:{port}", root / "artifacts"
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_train_and_evaluate_against_a_tracking_server(
    small: Params, mlflow_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, artifacts = mlflow_server
    unused = tmp_path / "not-used.db"
    params = run_params(
        small,
        tmp_path,
        f"sqlite:///{unused}",
        create_experiment=False,
        **SMALL_MODEL,
        **{"train.max_epochs": 2, "mlflow.experiment": "served"},
    )
    with inside(tmp_path, env={ENV_URI: url}):
        result = train(params)
        metrics = evaluate(params)
    assert not unused.exists() and not (tmp_path / "mlruns").exists()
    assert result.run.tracking_uri == url
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("served")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_epochs"] == "2"
    assert run.data.params["mlflow.tracking_uri"] == f"sqlite:///{unused}"  # the param...
    assert run.data.params["derived.tracking_uri"] == url  # ...and where the run really went
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"])
    assert abs(result.metrics["test/acc"] - metrics["accuracy"]) < 1e-6
    listed = artifact_paths(client, run.info.run_id)
    assert {"model/model.ckpt", "params.yaml", "evaluation/confusion_matrix.png"} <= listed
    # the artifacts went through the server into its artifact store
    stored = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert any(p.endswith("artifacts/evaluation/misclassified.png") for p in stored)
    model = next(p for p in artifacts.rglob("model.ckpt"))
    assert model.read_bytes() == Path(params.paths.model).read_bytes()


# --------------------------------------------------------------------------- MNIST recipe


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason=f"no MNIST IDX files at {MNIST}")
def test_mnist_recipe_with_dvc(tmp_path: Path) -> None:
    """The README's recipe: IDX files in data/mnist, convpipe recipe params/mnist.yaml, dvc repro.

    The whole recipe takes minutes (benchmarks/bench_mnist.py measures it); here one epoch on
    a tenth of the training images proves the file drives every stage.
    """
    project = make_project(tmp_path / "project")
    project.run("convpipe", "recipe", "params/mnist.yaml")
    (project.root / "data").mkdir(exist_ok=True)
    os.symlink(MNIST, project.root / "data" / "mnist", target_is_directory=True)
    project.set_params(**{"train.max_epochs": 1, "data.val_fraction": 0.9})
    project.run("dvc", "repro")
    manifest = load_manifest(project.root / "data" / "prepared")
    assert manifest.source == "mnist_idx" and manifest.image_hw == (28, 28)
    counts = {name: split.count for name, split in manifest.splits.items()}
    assert counts == {"train": 6000, "val": 54000, "test": 10000}
    metrics = json.loads((project.root / "metrics" / "train.json").read_text())
    assert metrics["epochs"] == 1 and metrics["test/count"] == 10000
    assert metrics["test/acc"] > 0.9
    evaluated = json.loads((project.root / "metrics" / "eval.json").read_text())
    assert evaluated["count"] == 10000
    assert abs(evaluated["accuracy"] - metrics["test/acc"]) < 1e-6

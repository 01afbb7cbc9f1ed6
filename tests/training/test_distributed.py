"""Multi-process training proven with CPU DDP (gloo): one run, exact metrics, outputs once."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess

import numpy as np
import pytest
import torch

from convpipe.data.datamodule import ConvDataModule
from convpipe.data.sampling import ShardSampler
from convpipe.errors import ConvpipeError
from convpipe.inference.predict import predict_logits
from convpipe.models.checkpoint import load_model
from convpipe.training.trainer import build_trainer, check_strategy
from tests.helpers.models import fp32
from tests.helpers.project import ROOT, make_project
from tests.helpers.servers import free_port

# --------------------------------------------------------------------------- fast


def test_shards_cover_every_image_exactly_once():
    for size in (269, 10, 3):
        for world in (1, 2, 3):
            seen = [i for rank in range(world) for i in ShardSampler(size, world, rank)]
            assert sorted(seen) == list(range(size))


def test_unknown_strategy_lists_choices():
    with pytest.raises(ConvpipeError, match=r"not a Lightning strategy \(did you mean 'ddp'\?\)"):
        check_strategy("dpp")
    assert check_strategy("ddp_spawn") == "ddp_spawn"


def test_more_gpus_than_available_is_a_clear_error(make_params):
    params = make_params(**{"train.accelerator": "gpu", "train.devices": 2})
    with pytest.raises(ConvpipeError, match=r"cannot build the Trainer"):
        build_trainer(fp32(params.train), [], False, "unused", interactive=False)


class _World:
    def __init__(self, world: int, rank: int) -> None:
        self.world_size, self.global_rank = world, rank


def _datamodule(batch_size, world, rank=0):
    dm = ConvDataModule.__new__(ConvDataModule)
    dm.batch_size = batch_size
    dm.trainer = _World(world, rank)
    return dm


def test_global_batch_is_split_over_processes():
    assert _datamodule(64, 2).device_batch_size(1000) == 32
    assert _datamodule("full", 2).device_batch_size(1001) == 501
    assert _datamodule(64, 1).device_batch_size(10) == 10


@pytest.mark.parametrize(("batch", "world"), [(1, 2), (3, 2), (64, 3)])
def test_batch_that_cannot_be_split_is_refused(batch, world):
    with pytest.raises(ConvpipeError, match=r"cannot be split evenly over"):
        _datamodule(batch, world).device_batch_size(1000)


# --------------------------------------------------------------------------- slow


def _runs(root):
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, status FROM runs").fetchall()


def _single_process_val_acc(root) -> float:
    model = load_model(root / "models/model.ckpt")
    dm = ConvDataModule(
        root / "data/prepared", None, 64, 0, False, 0, batch_transform="loader", resident=False
    )
    dataset = dm.split("val")
    preds = predict_logits(model, dataset, 64, "none").argmax(dim=1)
    return float((preds == torch.from_numpy(dataset.y)).float().mean())


def _ddp_val_acc_of_best(root) -> float:
    metrics = json.loads((root / "metrics/train.json").read_text())
    with open(root / "plots/train/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    best = min(rows, key=lambda r: abs(float(r["val/loss"]) - metrics["best"]))
    assert abs(float(best["val/loss"]) - metrics["best"]) < 1e-9
    return float(best["val/acc"])


@pytest.fixture(scope="module")
def ddp_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("ddp"))
    project.set_params(**{"train.devices": 2, "train.strategy": "ddp", "train.max_epochs": 6})
    project.run("dvc", "repro")
    return project


@pytest.mark.slow
def test_ddp_train_stage_one_run_exact_counts(ddp_project):
    root = ddp_project.root
    runs = _runs(root)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    metrics = json.loads((root / "metrics/train.json").read_text())
    prepared = json.loads((root / "data/prepared/manifest.json").read_text())
    assert metrics["test/count"] == prepared["splits"]["test"]["count"] == 269
    assert abs(_single_process_val_acc(root) - _ddp_val_acc_of_best(root)) < 1e-6
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    assert abs(evaluated["accuracy"] - metrics["test/acc"]) < 1e-6
    assert evaluated["count"] == 269


@pytest.mark.slow
def test_ddp_outputs_written_once_and_whole(ddp_project):
    root = ddp_project.root
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not [p for p in root.rglob(".*.tmp")]
    load_model(root / "models/model.ckpt")
    history = (root / "plots/train/history.csv").read_text().splitlines()
    assert len(history) == json.loads((root / "metrics/train.json").read_text())["epochs"] + 1
    assert ddp_project.run("dvc", "status").stdout.strip().endswith("up to date.")


@pytest.mark.slow
def test_torchrun_two_nodes_on_one_machine(tmp_path):
    project = make_project(tmp_path / "nodes")
    project.run("dvc", "repro", "augment")
    project.set_params(
        **{"train.devices": 1, "train.num_nodes": 2, "train.strategy": "ddp", "train.max_epochs": 3}
    )
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "pipelines/train.py",
            ],
            cwd=project.root,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:  # one node failing leaves the other waiting at the rendezvous
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    runs = _runs(project.root)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    metrics = json.loads((project.root / "metrics/train.json").read_text())
    assert metrics["test/count"] == 269
    assert np.isfinite(metrics["test/acc"])


@pytest.mark.slow
def test_ddp_tuning_trial_samples_once_for_both_ranks(tmp_path):
    import optuna

    project = make_project(tmp_path / "tune")
    project.run("dvc", "repro", "augment")
    project.set_params(
        **{
            "train.devices": 2,
            "train.accelerator": "cpu",
            "tune.max_epochs": 2,
            "tune.study_name": "ddp",
        }
    )
    project.run("convpipe", "tune", "--n-trials", "1")
    study = optuna.load_study(study_name="ddp", storage=f"sqlite:///{project.root}/optuna.db")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["ddp_ranks_agreed"] == 2  # both ranks gathered one digest
    assert len(trial.intermediate_values) == 2  # rank 0 reported each epoch to the pruner


def test_ddp_tuning_refuses_journal_storage(make_params):
    from convpipe.tuning.worker import check_distributed_storage

    params = make_params(**{"train.devices": 2, "tune.storage": "journal:optuna.journal"})
    with pytest.raises(ConvpipeError, match=r"must be an RDB URL"):
        check_distributed_storage(params)


def test_the_sbatch_script_asks_for_the_signal_convpipe_requeues_on():
    from convpipe.training.preemption import REQUEUE_SIGNAL

    lines = (ROOT / "slurm/train.sbatch").read_text().splitlines()
    options = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]
    warned = [o for o in options if o.startswith("--signal=")]
    assert warned and warned[0].startswith(f"--signal={signal.Signals(REQUEUE_SIGNAL).name[3:]}@")
    assert int(warned[0].split("@")[1]) >= 60  # time to finish a batch and write last.ckpt
    assert "--requeue" in options and "--open-mode=append" in options  # one log per job


@pytest.mark.slow
def test_slurm_srun_launch_two_tasks(tmp_path):
    # What `srun --ntasks-per-node=2` does: start every task with SLURM's variables set;
    # Lightning's SLURMEnvironment takes ranks and the rendezvous from them.
    project = make_project(tmp_path / "slurm")
    project.run("dvc", "repro", "augment")
    project.set_params(**{"train.devices": 2, "train.strategy": "ddp", "train.max_epochs": 2})
    slurm = {
        "SLURM_JOB_ID": str(free_port()),
        "SLURM_JOB_NAME": "convpipe",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
    }
    tasks = [
        subprocess.Popen(
            ["python", "pipelines/train.py"],
            cwd=project.root,
            env={**project.env, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [task.communicate(timeout=300)[0] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    assert [task.returncode for task in tasks] == [0, 0], outputs
    for rank, output in enumerate(outputs):  # each rank is SLURM_PROCID's, of SLURM_NTASKS
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output, output
    runs = _runs(project.root)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    assert json.loads((project.root / "metrics/train.json").read_text())["test/count"] == 269

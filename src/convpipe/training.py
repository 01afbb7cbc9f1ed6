"""The train stage: a Trainer built from params, early stopping, checkpoints, MLflow.

:func:`train` is the one function ``pipelines/train.py`` calls. It trains on the prepared +
augmented data, tests the best checkpoint, and writes the DVC outputs named in ``paths:``.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import MLFlowLogger

from convpipe.config import Params, TrainParams
from convpipe.data.dataset import MANIFEST
from convpipe.datamodule import ConvDataModule
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path, write_json, write_text
from convpipe.model import CNNClassifier
from convpipe.tracking import RunInfo, check_reachable, mask_uri, params_for_mlflow, run_tags
from convpipe.tracking import tracking_uri as resolve_uri

HISTORY_COLUMNS = (
    "epoch",
    "train/loss",
    "train/acc",
    "train/objective",
    "val/loss",
    "val/acc",
    "lr",
)


class EpochHistory(Callback):
    """Collects one row of epoch-level metrics per training epoch (for ``dvc plots``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the epoch's train and val metrics (validation has run by now)."""
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        for key in HISTORY_COLUMNS[1:-1]:
            if key in metrics:
                row[key] = float(metrics[key])
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append(row)

    def to_csv(self) -> str:
        """The history as CSV text, one row per epoch."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "epoch" else v) for k, v in row.items()})
        return buf.getvalue()


def build_trainer(
    train: TrainParams, callbacks: list[Callback], logger: MLFlowLogger | bool, root: str
) -> L.Trainer:
    """A Trainer configured from the ``train`` section (deterministic, epoch-level logging)."""
    try:
        return L.Trainer(
            accelerator=train.accelerator,
            devices=train.devices,
            strategy=train.strategy,
            num_nodes=train.num_nodes,
            precision=train.precision,
            max_epochs=train.max_epochs,
            deterministic=True,
            callbacks=callbacks,
            logger=logger,
            default_root_dir=root,
            log_every_n_steps=1,
        )
    except (ValueError, RuntimeError, MisconfigurationException) as exc:
        raise ConvpipeError(
            f"cannot build the Trainer: {' '.join(str(exc).split())}",
            "in params.yaml train.accelerator/devices/strategy/num_nodes/precision",
            "choose values your machine supports",
        ) from None


def check_batch_size(train: TrainParams, train_size: int) -> None:
    """Refuse a batch size larger than the training set (every epoch would be one short batch)."""
    if train.batch_size != "full" and int(train.batch_size) > train_size:
        raise ConvpipeError(
            f"train.batch_size is {train.batch_size} but the train split has {train_size} images",
            "in params.yaml",
            "lower train.batch_size or use batch_size: full for batch gradient descent",
        )


@contextmanager
def failed_run_on_error(logger: MLFlowLogger) -> Iterator[None]:
    """Mark the MLflow run FAILED if anything below raises, so no run stays RUNNING."""
    try:
        yield
    except BaseException:
        if logger.run_id is not None:
            logger.experiment.set_terminated(logger.run_id, "FAILED")
        raise


@dataclass
class TrainResult:
    """What a training produced."""

    best_checkpoint: str
    metrics: dict[str, Any]
    run: RunInfo


def _make_logger(params: Params) -> MLFlowLogger:
    uri = resolve_uri(params.mlflow)
    check_reachable(uri)
    logger = MLFlowLogger(
        experiment_name=params.mlflow.experiment,
        tracking_uri=uri,
        tags=run_tags(("prepare", "augment")),
    )
    logger.log_hyperparams(params_for_mlflow(params))
    return logger


def _callbacks(
    train: TrainParams, checkpoints: str
) -> tuple[ModelCheckpoint, EpochHistory, list[Callback]]:
    checkpoint = ModelCheckpoint(
        dirpath=checkpoints,
        filename="best",
        monitor=train.monitor,
        mode=train.monitor_mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    history = EpochHistory()
    early = EarlyStopping(monitor=train.monitor, mode=train.monitor_mode, patience=train.patience)
    lr = LearningRateMonitor(logging_interval="epoch")
    return checkpoint, history, [checkpoint, early, lr, history]


def _summary(
    trainer: L.Trainer, checkpoint: ModelCheckpoint, test: Mapping[str, float]
) -> dict[str, Any]:
    best = checkpoint.best_model_score
    return {
        "epochs": int(trainer.current_epoch),
        "stopped_early": bool(
            trainer.should_stop and trainer.current_epoch < (trainer.max_epochs or 0)
        ),
        "monitor": checkpoint.monitor,
        "best": float(best) if best is not None else math.nan,
        **{k: float(v) for k, v in test.items()},
    }


def train(params: Params) -> TrainResult:
    """Train, test the best checkpoint and write every train-stage output.

    Raises:
        ConvpipeError: bad params for this data, an unreachable tracking server, divergence.
    """
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    paths, cfg = params.paths, params.train
    datamodule = ConvDataModule(
        paths.prepared,
        paths.augmented,
        cfg.batch_size,
        cfg.num_workers,
        params.augment.online,
        params.base.seed,
    )
    manifest = datamodule.manifest
    check_batch_size(cfg, datamodule.train_size)
    model = CNNClassifier(
        model=params.model.model_dump(mode="json"),
        train=cfg.model_dump(mode="json"),
        in_channels=manifest.channels,
        image_hw=manifest.image_hw,
        num_classes=manifest.num_classes,
        train_size=datamodule.train_size,
        class_names=manifest.class_names,
    )
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
    logger = _make_logger(params)
    checkpoint, history, callbacks = _callbacks(cfg, paths.checkpoints)
    with failed_run_on_error(logger):
        trainer = build_trainer(cfg, callbacks, logger, paths.checkpoints)
        trainer.fit(model, datamodule=datamodule)
        test = trainer.test(
            model, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False
        )
        metrics = _summary(trainer, checkpoint, test[0])
        run = RunInfo(
            str(logger.run_id), str(logger.experiment_id), mask_uri(resolve_uri(params.mlflow))
        )
        _write_outputs(params, checkpoint.best_model_path, history, metrics, run)
        _log_artifacts(logger, params)
    return TrainResult(paths.model, metrics, run)


def _write_outputs(
    params: Params, best: str, history: EpochHistory, metrics: dict[str, Any], run: RunInfo
) -> None:
    paths = params.paths
    with atomic_path(paths.model) as tmp:
        shutil.copyfile(best, tmp)
    write_json(paths.train_metrics, metrics)
    write_text(paths.train_history, history.to_csv())
    run.save(paths.run_info)


def _log_artifacts(logger: MLFlowLogger, params: Params) -> None:
    client, run_id = logger.experiment, str(logger.run_id)
    client.log_artifact(run_id, "params.yaml")
    client.log_artifact(run_id, str(Path(params.paths.prepared) / MANIFEST), "data")
    client.log_artifact(run_id, params.paths.model, "model")
    client.log_artifact(run_id, params.paths.train_history, "plots")

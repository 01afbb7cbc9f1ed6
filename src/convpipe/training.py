"""The train stage: a Trainer built from params, early stopping, checkpoints, MLflow.

:func:`train` is the one function ``pipelines/train.py`` calls. It trains on the prepared +
augmented data, tests the best checkpoint, and writes the DVC outputs named in ``paths:``.

The MLflow run gets, once each: a name saying what it is (the DVC experiment's, see
:func:`convpipe.tracking.provenance.run_name`), every resolved param (``train.lr``,
``model.conv``, ...)
plus the values derived from the data (``derived.*``), tags naming the code, data and DVC
experiment (git commit, dirty flag, ``dvc.lock`` hashes, ``dvc.exp_name``), its input datasets,
per-epoch metrics (stepped by epoch), the test metrics of the best checkpoint, and the
artifacts ``params.yaml`` (resolved, URIs masked), the data manifests, the model and the
history. ``metrics/train.json`` records the run's id, so DVC's side leads to it. Whatever
fails after the run is opened marks it FAILED (KILLED on an interrupt): no run is ever left
RUNNING.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger, Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from convpipe.config import Params, TrainParams
from convpipe.data.datamodule import ConvDataModule
from convpipe.data.manifest import MANIFEST, PIPELINE_FILE
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path, write_json, write_text
from convpipe.models.checkpoint import AtomicCheckpointIO
from convpipe.models.module import CNNClassifier
from convpipe.resume import (
    InterruptCheckpoint,
    Preempted,
    Preemption,
    RngState,
    clear_record,
    find_resume_point,
    fingerprint,
    preemption_is_resumable,
    start_record,
)
from convpipe.tracking.params import log_params, masked_params, params_for_mlflow
from convpipe.tracking.provenance import (
    FREEZE_ARTIFACT,
    RunInfo,
    dataset_inputs,
    pip_freeze,
    run_name,
    run_tags,
    training_note,
)
from convpipe.tracking.store import (
    TrackingLost,
    artifact_location,
    check_reachable,
    is_tracking_failure,
    mark_model_training,
    mask_uri,
    mlflow_error,
    store_lock,
)
from convpipe.tracking.store import tracking_uri as resolve_uri

HISTORY_COLUMNS = (
    "epoch",
    "train/loss",
    "train/acc",
    "train/objective",
    "val/loss",
    "val/acc",
    "lr",
)
# What CNNClassifier logs at epoch level during fit: the metrics train.monitor may name.
MONITORS = ("train/loss", "train/acc", "train/objective", "train/penalty", "val/loss", "val/acc")
# The DVC stages whose outputs training reads (their dvc.lock hashes become run tags).
INPUT_STAGES = ("prepare", "augment")
BEST, LAST = "best", "last"
# Set on the MLflow run a preemption stopped: what stopped it and where its state is.
INTERRUPTED_TAG = "convpipe.last_interruption"
# Sources that need no data.path: where their images come from, for MLflow's dataset source.
BUILTIN_SOURCES = {"digits": "sklearn.datasets.load_digits"}

log = logging.getLogger("convpipe")


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

    def state_dict(self) -> dict[str, Any]:
        """The rows so far: saved in checkpoints so a resumed training keeps its history."""
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rows of the epochs before an interruption."""
        self.rows = [dict(row) for row in state_dict["rows"]]

    def to_csv(self) -> str:
        """The history as CSV text, one row per epoch."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "epoch" else v) for k, v in row.items()})
        return buf.getvalue()


class RunLogger(MLFlowLogger):
    """MLFlowLogger that leaves params to :func:`train`.

    Lightning would log the LightningModule's ``hparams`` a second time under other names
    (``train/lr`` beside ``train.lr``) and truncate every value to 250 characters; the run's
    params are logged once, in full, by :func:`convpipe.tracking.params.log_params` instead.
    """

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Ignore Lightning's hparams (see the class docstring)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log with the epoch as MLflow's step, so charts plot ``val/acc`` per epoch.

        Every metric convpipe logs is epoch-level; Lightning would step them by optimiser
        steps, whose count per epoch changes with the batch size and so misaligns runs.
        """
        epoch = metrics.get("epoch")
        super().log_metrics(metrics, int(epoch) if epoch is not None else step)


class EpochLearningRate(LearningRateMonitor):
    """Lightning's LearningRateMonitor (``lr-Adam``, ...) with the epoch as its step.

    The stock callback steps its value by optimiser steps; convpipe logs every metric per
    epoch (see :meth:`RunLogger.log_metrics`), and the learning rate must line up with them.
    """

    def __init__(self) -> None:
        super().__init__(logging_interval="epoch")

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Log each optimiser's learning rate for the epoch about to start."""
        stats = self._extract_stats(trainer, "any")  # what the stock callback asks for here
        if stats:
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.current_epoch)


def build_trainer(
    train: TrainParams,
    callbacks: list[Callback],
    logger: Logger | bool,
    root: str,
    *,
    interactive: bool,
    **options: Any,
) -> L.Trainer:
    """A Trainer configured from the ``train`` section (deterministic, epoch-level logging).

    Args:
        train: the ``train`` section.
        callbacks: every callback (checkpointing only happens through these).
        logger: the MLflow logger, or False.
        root: Lightning's working folder.
        interactive: show the progress bar and model summary (off for tuning trials).
        **options: further ``L.Trainer`` arguments (benchmarks turn validation off with
            ``limit_val_batches=0``); they override the ones derived from ``train``.

    Raises:
        ConvpipeError: If the accelerator, devices, strategy or precision are not usable here.
    """
    settings: dict[str, Any] = {
        "accelerator": train.accelerator,
        "devices": train.devices,
        "strategy": check_strategy(train.strategy),
        "num_nodes": train.num_nodes,
        "precision": train.precision,
        "max_epochs": train.max_epochs,
        "deterministic": True,
        "callbacks": callbacks,
        "logger": logger,
        "default_root_dir": root,
        "log_every_n_steps": 1,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": interactive,
        "enable_model_summary": interactive,
        "sync_batchnorm": train.sync_batchnorm,
        # the DataModule shards itself: seeded for train, unpadded for val/test
        "use_distributed_sampler": False,
        "plugins": _plugins(),
    }
    try:
        return L.Trainer(**{**settings, **options})
    except (ValueError, RuntimeError, MisconfigurationException) as exc:
        raise ConvpipeError(
            f"cannot build the Trainer: {' '.join(str(exc).split())}",
            "in params.yaml train.accelerator/devices/strategy/num_nodes/precision",
            "choose values your machine supports",
        ) from None


def _plugins() -> list[Any]:
    """Atomic checkpoint writes; on SLURM, Lightning's environment without its requeue handler.

    convpipe requeues a SLURM job itself (:class:`convpipe.resume.Preemption`).
    """
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def check_strategy(strategy: str) -> str:
    """``strategy`` if Lightning knows it.

    Raises:
        ConvpipeError: listing the strategies Lightning knows.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if strategy in known:
        return strategy
    close = difflib.get_close_matches(strategy, known, n=1)
    raise ConvpipeError(
        f"train.strategy '{strategy}' is not a Lightning strategy"
        + (f" (did you mean '{close[0]}'?)" if close else ""),
        "in params.yaml",
        f"choose one of: {', '.join(known)}",
    )


def check_batch_size(train: TrainParams, train_size: int) -> None:
    """Refuse a batch size larger than the training set (every epoch would be one short batch).

    Raises:
        ConvpipeError: If ``train.batch_size`` is a number above ``train_size``.
    """
    if train.batch_size != "full" and int(train.batch_size) > train_size:
        raise ConvpipeError(
            f"train.batch_size is {train.batch_size} but the train split has {train_size} images",
            "in params.yaml",
            "lower train.batch_size or use batch_size: full for batch gradient descent",
        )


def check_monitor(train: TrainParams) -> None:
    """Refuse a ``train.monitor`` the model never logs (Lightning would fail mid-training).

    Raises:
        ConvpipeError: naming the closest valid metric.
    """
    if train.monitor in MONITORS:
        return
    close = difflib.get_close_matches(train.monitor, MONITORS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(MONITORS)}"
    raise ConvpipeError(
        f"train.monitor is '{train.monitor}', a metric the model does not log",
        "in params.yaml",
        hint,
    )


def _terminate(logger: MLFlowLogger | DummyLogger, status: str) -> None:
    """Set the run's final status; a tracking failure here must not hide the original error."""
    try:
        logger.experiment.set_terminated(str(logger.run_id), status)
    except Exception as exc:  # already failing: the first error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, exc)


def _tag(logger: MLFlowLogger | DummyLogger, key: str, value: str) -> None:
    """Tag the run; like :func:`_terminate`, never hiding the error being reported."""
    try:
        logger.experiment.set_tag(str(logger.run_id), key, value)
    except Exception as exc:
        log.warning("could not tag MLflow run %s: %s", logger.run_id, exc)


@contextmanager
def tracking_lost_is_resumable(uri: str, checkpoints: str) -> Iterator[None]:
    """Turn a tracking store that died mid-training into one line saying how to resume.

    The last finished epoch is in ``checkpoints`` and the resume record is kept, so the rerun
    continues into the same MLflow run once the store answers again.
    """
    try:
        yield
    except TrackingLost:
        raise
    except Exception as exc:
        if not is_tracking_failure(exc):
            raise
        first = " ".join(str(getattr(exc, "message", exc)).split())[:200]
        raise TrackingLost(
            f"MLflow stopped answering during training ({type(exc).__name__}: {first})",
            f"at {mask_uri(uri)}; the last finished epoch is saved in {checkpoints}",
            "bring the tracking server back and rerun: the training resumes from that epoch",
        ) from None


@contextmanager
def failed_run_on_error(logger: MLFlowLogger | DummyLogger) -> Iterator[None]:
    """Mark the MLflow run FAILED (KILLED on an interrupt) if anything below raises.

    The run must already exist (see :func:`start_run`), so no run stays RUNNING. Lightning
    answers Ctrl+C inside ``fit``/``test`` with ``sys.exit(1)`` after its own cleanup; that
    exit is re-raised as the KeyboardInterrupt it was, so the stage reports it in one line.
    """
    try:
        yield
    except Preempted as exc:
        _terminate(logger, "KILLED")
        _tag(logger, INTERRUPTED_TAG, exc.description)
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        _terminate(logger, "KILLED")
        if isinstance(exc, SystemExit):
            raise KeyboardInterrupt from exc
        raise
    except BaseException as exc:
        if not is_tracking_failure(exc):  # else the store is gone: nothing to mark it in
            _terminate(logger, "FAILED")
        raise


@contextmanager
def _resume_record_on(folder: str, rank_zero: bool) -> Iterator[None]:
    """Keep the resume record only while training may still be resumed.

    A finished training, or one that failed for a reason a rerun would meet again (bad
    params, divergence), removes it; an interrupted one (Ctrl+C, a kill, a preemption
    signal, a tracking store that stopped answering) keeps it.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, Preempted):
        raise
    except BaseException as exc:
        if rank_zero and not is_tracking_failure(exc):
            clear_record(folder)
        raise
    if rank_zero:
        clear_record(folder)


@dataclass
class TrainResult:
    """What a training produced."""

    best_checkpoint: str
    metrics: dict[str, Any]
    run: RunInfo


def start_run(params: Params, uri: str, run_id: str | None = None) -> RunLogger | DummyLogger:
    """Open the MLflow run (creating the experiment if needed) and return its logger.

    Under DDP only rank 0 opens the run: the other ranks get a logger that does nothing
    (Lightning logs from rank 0 anyway), so they never touch the store — several processes
    creating one fresh sqlite database at once would race.

    Raises:
        ConvpipeError: If the tracking store is unreachable or refuses the run.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return DummyLogger()
    from mlflow.exceptions import MlflowException

    check_reachable(uri)
    tags = run_tags(INPUT_STAGES)
    tags["mlflow.note.content"] = training_note(tags)
    try:
        with store_lock(uri):
            logger = RunLogger(
                experiment_name=params.mlflow.experiment,
                run_name=run_name(tags),  # unused when resuming: the run keeps its name
                tracking_uri=uri,
                tags=tags,
                run_id=run_id,
                artifact_location=artifact_location(uri),
            )
            _ = logger.experiment  # creates the experiment and the run now, not mid-training
            mark_model_training(logger.experiment, str(logger.experiment_id))
            if run_id is not None:  # a resumed run was left RUNNING (or KILLED) by the kill
                logger.experiment.update_run(run_id, status="RUNNING")
    except (MlflowException, OSError) as exc:
        raise mlflow_error(exc, uri, "opening a run") from None
    return logger


def _callbacks(
    train: TrainParams, checkpoints: str
) -> tuple[ModelCheckpoint, EpochHistory, Preemption, list[Callback]]:
    """The best-checkpoint, history and preemption callbacks, and the full list."""
    best = ModelCheckpoint(
        dirpath=checkpoints,
        filename=BEST,
        monitor=train.monitor,
        mode=train.monitor_mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Lightning 2.6 rewrites save_last's last.ckpt only when a better checkpoint is saved in
    # the same step, so an unmonitored ModelCheckpoint writes last.ckpt after every epoch.
    last = InterruptCheckpoint(checkpoints, LAST)
    history = EpochHistory()
    early = EarlyStopping(monitor=train.monitor, mode=train.monitor_mode, patience=train.patience)
    lr = EpochLearningRate()
    preemption = Preemption()
    callbacks: list[Callback] = [best, last, early, lr, history, RngState(), preemption]
    return best, history, preemption, callbacks


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


def build_datamodule(params: Params) -> ConvDataModule:
    """The DataModule over ``paths.prepared`` + ``paths.augmented`` as params configure it."""
    return ConvDataModule(
        params.paths.prepared,
        params.paths.augmented,
        params.train.batch_size,
        params.runtime.num_workers,
        params.augment.online,
        params.base.seed,
    )


def _derived(datamodule: ConvDataModule, uri: str) -> dict[str, str]:
    """Run params that come from the data and the environment, not from params.yaml."""
    manifest = datamodule.manifest
    return {
        "derived.tracking_uri": mask_uri(uri),  # $MLFLOW_TRACKING_URI may override the param
        "derived.num_classes": str(manifest.num_classes),
        "derived.in_channels": str(manifest.channels),
        "derived.image_hw": str(list(manifest.image_hw)),
        "derived.train_size": str(datamodule.train_size),
        "derived.content_hash": manifest.content_hash,
    }


def _datasets(params: Params, datamodule: ConvDataModule) -> list[Any]:
    """The MLflow dataset inputs of this training.

    See :func:`convpipe.tracking.provenance.dataset_inputs`.
    """
    origin = params.data.path
    if origin is None:
        origin = BUILTIN_SOURCES.get(params.data.source, params.data.source)
    return dataset_inputs(datamodule.manifest, datamodule.augmented, origin)


def build_model(params: Params) -> tuple[ConvDataModule, CNNClassifier]:
    """The DataModule and a fresh CNN for it, after checking params against the data.

    Raises:
        ConvpipeError: an unknown monitor, a batch larger than the train split, a network
            that does not fit the images.
    """
    check_monitor(params.train)
    check_strategy(params.train.strategy)  # before any run is opened for a params typo
    datamodule = build_datamodule(params)
    manifest = datamodule.manifest
    check_batch_size(params.train, datamodule.train_size)
    model = CNNClassifier(
        model=params.model.model_dump(mode="json"),
        train=params.train.model_dump(mode="json"),
        in_channels=manifest.channels,
        image_hw=manifest.image_hw,
        num_classes=manifest.num_classes,
        train_size=datamodule.train_size,
        class_names=manifest.class_names,
    )
    model.use_runtime(params.runtime)
    return datamodule, model


def train(params: Params) -> TrainResult:
    """Train (or resume an interrupted training), test the best checkpoint, write outputs.

    Raises:
        ConvpipeError: bad params for this data, an unreachable tracking server, divergence,
            an interrupted training with other params in ``paths.checkpoints``.
    """
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    paths, cfg = params.paths, params.train
    datamodule, model = build_model(params)
    current = fingerprint(params, datamodule.manifest.content_hash, datamodule.train_size)
    resume = find_resume_point(paths.checkpoints, current)
    uri = resolve_uri(params.mlflow)
    logger = start_run(params, uri, resume.run_id if resume else None)
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    with (
        tracking_lost_is_resumable(uri, paths.checkpoints),
        failed_run_on_error(logger),
        _resume_record_on(paths.checkpoints, rank_zero),
    ):
        client: Any = logger.experiment  # a no-op stand-in on DDP ranks other than 0
        run_id = str(getattr(logger, "run_id", ""))
        if resume is None and rank_zero:  # other DDP ranks start later
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
            start_record(paths.checkpoints, run_id, current)
            log_params(client, run_id, {**params_for_mlflow(params), **_derived(datamodule, uri)})
            client.log_dict(run_id, masked_params(params), "params.yaml")
            client.log_text(run_id, pip_freeze(), FREEZE_ARTIFACT)
            client.log_inputs(run_id, datasets=_datasets(params, datamodule))
        elif resume is not None:
            log.info("resuming the interrupted training from %s", resume.checkpoint)
        best, history, preemption, callbacks = _callbacks(cfg, paths.checkpoints)
        trainer = build_trainer(cfg, callbacks, logger, paths.checkpoints, interactive=True)
        with preemption_is_resumable(trainer, preemption, paths.checkpoints):
            ckpt = resume.checkpoint if resume else None
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
        # before test(): restoring the best checkpoint also restores its (shorter) history
        history_csv = history.to_csv()
        test = trainer.test(
            model, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False
        )
        metrics = {**_summary(trainer, best, test[0]), "mlflow_run_id": run_id}
        run = RunInfo(run_id, str(getattr(logger, "experiment_id", "")), mask_uri(uri))
        if trainer.is_global_zero:  # under DDP every rank gets here; one writes
            _write_outputs(params, best.best_model_path, history_csv, metrics)
            _log_artifacts(cast(MLFlowLogger, logger), params)
            run.save(paths.run_info)  # last: evaluate only ever finds a complete run
            client.set_terminated(run_id, "FINISHED")
    return TrainResult(paths.model, metrics, run)


def _write_outputs(params: Params, best: str, history_csv: str, metrics: dict[str, Any]) -> None:
    paths = params.paths
    with atomic_path(paths.model) as tmp:
        shutil.copyfile(best, tmp)
    write_json(paths.train_metrics, metrics)
    write_text(paths.train_history, history_csv)


def _log_artifacts(logger: MLFlowLogger, params: Params) -> None:
    """The data manifests (and augmentation pipeline), the model and the history."""
    client, run_id = logger.experiment, str(logger.run_id)
    client.log_artifact(run_id, str(Path(params.paths.prepared) / MANIFEST), "data")
    augmented = Path(params.paths.augmented)
    for name in (MANIFEST, PIPELINE_FILE):
        if (augmented / name).is_file():
            client.log_artifact(run_id, str(augmented / name), "data/augmented")
    client.log_artifact(run_id, params.paths.model, "model")
    client.log_artifact(run_id, params.paths.train_history, "plots")

"""The train stage's work: build, fit (or resume), test the best checkpoint, write outputs."""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from convpipe.config.schema import Params, TrainParams
from convpipe.data.datamodule import ConvDataModule
from convpipe.errors import Preempted, is_disk_full
from convpipe.io import atomic_path, write_json, write_text
from convpipe.models.module import CNNClassifier
from convpipe.models.optim import budget_epochs, global_batch
from convpipe.models.transfer import read_weights, transfer_weights
from convpipe.models.whitening import WHITEN_IMAGES
from convpipe.redact import mask
from convpipe.tracking.init_source import fetched
from convpipe.tracking.params import log_params, masked_params, params_for_mlflow
from convpipe.tracking.provenance import (
    FREEZE_ARTIFACT,
    INIT_RUN_TAG,
    INIT_TAG,
    RunInfo,
    init_note,
    pip_freeze,
)
from convpipe.tracking.runs import (
    derived_params,
    failed_run_on_error,
    log_artifacts,
    run_datasets,
    start_run,
    system_metrics,
    tracking_lost_is_resumable,
)
from convpipe.tracking.store import (
    is_tracking_failure,
)
from convpipe.tracking.store import tracking_uri as resolve_uri
from convpipe.training.callbacks import LiveFiles
from convpipe.training.cost import TrainingCost
from convpipe.training.precision import resolve_precision
from convpipe.training.preemption import (
    RERUN_TRAIN,
    InterruptCheckpoint,
    Preemption,
    preemption_is_resumable,
)
from convpipe.training.resume import (
    RngState,
    clear_record,
    find_resume_point,
    fingerprint,
    start_record,
)
from convpipe.training.trainer import (
    LAST,
    build_trainer,
    check_batch_size,
    check_monitor,
    check_strategy,
    training_callbacks,
    trial_callbacks,
)

log = logging.getLogger("convpipe")


@contextmanager
def _resume_record_on(folder: str, rank_zero: bool) -> Iterator[None]:
    """Keep the resume record only while training may still be resumed.

    A finished training, or one that failed for a reason a rerun would meet again (bad
    params, divergence), removes it; an interrupted one (Ctrl+C, a kill, a preemption
    signal, a tracking store that stopped answering, a full disk) keeps it.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, Preempted):
        raise
    except BaseException as exc:
        if rank_zero and not (is_tracking_failure(exc) or is_disk_full(exc)):
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
        batch_transform=params.runtime.batch_transform,
        resident=params.runtime.resident,
        stream_from=params.runtime.stream_from,
    )


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
    model.set_class_counts(datamodule.train_class_counts())
    if params.model.whiten:
        model.init_whitening(whitening_sample(datamodule))
    if params.model.init_from is not None:  # after whitening: the source's filters win
        model.init_tags = start_from(params, model)
    model.use_runtime(params.runtime)
    return datamodule, model


def start_from(params: Params, model: CNNClassifier) -> dict[str, str]:
    """Load ``model.init_from``'s weights into ``model`` where they fit; say what was taken.

    Returns:
        The MLflow tags recording the source: ``convpipe.init_from`` (passwords masked) and,
        for weights trained in an MLflow run, ``convpipe.init_from.run_id``.

    Raises:
        ConvpipeError: An unreadable, unsafe or missing source, another architecture.
    """
    source = str(params.model.init_from)
    uri = resolve_uri(params.mlflow)
    with fetched(source, uri) as weights:
        report = transfer_weights(
            model.net, read_weights(weights.path), mask(source), model.hparams["class_names"]
        )
    log.info("%s", report.describe(mask(source)))
    tags = {INIT_TAG: mask(source)}
    if weights.run_id:
        tags[INIT_RUN_TAG] = weights.run_id
    return tags


def resolved_train(params: Params, model: CNNClassifier, train_size: int) -> TrainParams:
    """The ``train`` section as the Trainer takes it.

    ``precision: auto`` replaced by this machine's choice, and ``max_epochs`` by the epochs
    ``train.max_steps`` allows (:func:`convpipe.models.optim.budget_epochs`).
    """
    train = params.train
    precision = resolve_precision(train, params.runtime, model, global_batch(train, train_size))
    epochs = budget_epochs(train, train_size)
    return train.model_copy(update={"precision": precision, "max_epochs": epochs})


def fit_trial(
    params: Params,
    extra: Sequence[Callback],
    logger: Logger,
    folder: str,
    resume: str | None = None,
    todo: str = RERUN_TRAIN,
) -> tuple[TrainParams, list[dict[str, float]]]:
    """Train as the train stage does, without outputs: one tuning trial.

    The same seeding, data, model (``model.init_from`` and whitening included), resolved
    ``train`` section and learning callbacks (:func:`~convpipe.training.trainer.trial_callbacks`)
    as :func:`train`; no progress bar, nothing written outside ``folder``. ``last.ckpt`` there
    is rewritten after every epoch and on a preemption signal (with the random states), so a
    trial whose worker died can go on from it.

    Args:
        params: The trial's params (its sampled values applied).
        extra: The search's callbacks (pruning, rank checks).
        logger: Where the epochs' metrics go (the trial's MLflow child run).
        folder: Lightning's working folder and the trial's ``last.ckpt``.
        resume: A ``last.ckpt`` of this same trial to continue from (None: from scratch).
        todo: What resumes the trial if a preemption signal stops it.

    Returns:
        The resolved ``train`` section and the per-epoch history rows, those before a resume
        included (empty on spawned DDP ranks, whose history stays in the child processes).

    Raises:
        ConvpipeError: Bad params for this data, divergence.
        Preempted: SIGTERM or SIGUSR1 stopped it; ``last.ckpt`` holds the batch reached.
    """
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)
    cfg = resolved_train(params, model, datamodule.train_size)
    preemption = Preemption()
    keep = [InterruptCheckpoint(folder, LAST), RngState(), preemption]
    history, callbacks = trial_callbacks(cfg, *extra, resumable=keep)
    trainer = build_trainer(cfg, callbacks, logger, folder, interactive=False)
    with preemption_is_resumable(trainer, preemption, folder, todo), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    return cfg, history.rows


def whitening_sample(datamodule: ConvDataModule) -> Tensor:
    """Up to :data:`WHITEN_IMAGES` training images, evenly spread, normalised: ``(N, C, H, W)``."""
    dataset = datamodule.split("train")
    count = min(WHITEN_IMAGES, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    return dataset.__getitems__(indices)[0]


def train(params: Params) -> TrainResult:
    """Train (or resume an interrupted training), test the best checkpoint, write outputs.

    Raises:
        ConvpipeError: bad params for this data, an unreachable tracking server, divergence,
            an interrupted training with other params in ``paths.checkpoints``.
    """
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    paths = params.paths
    datamodule, model = build_model(params)
    current = fingerprint(params, datamodule.manifest.content_hash, datamodule.train_size)
    resume = find_resume_point(paths.checkpoints, current)
    uri = resolve_uri(params.mlflow)
    logger = start_run(params, uri, resume.run_id if resume else None)
    # after the tracking server answered: a dead one fails at once, not after the probe
    cfg = resolved_train(params, model, datamodule.train_size)
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
            log_params(
                client,
                run_id,
                {
                    **params_for_mlflow(params),
                    **derived_params(datamodule, uri),
                    "derived.precision": cfg.precision,  # what train.precision auto chose
                },
            )
            client.log_dict(run_id, masked_params(params), "params.yaml")
            client.log_text(run_id, pip_freeze(), FREEZE_ARTIFACT)
            client.log_inputs(run_id, datasets=run_datasets(params, datamodule))
            _tag_init(client, run_id, model.init_tags)
        elif resume is not None:
            log.info("resuming the interrupted training from %s", resume.checkpoint)
        best, history, preemption, callbacks = training_callbacks(cfg, paths.checkpoints)
        cost = TrainingCost(cfg.precision)
        live = LiveFiles(history, paths.train_history, paths.train_metrics, cfg)
        callbacks += [cost, live]  # after the history: it writes the history's rows
        trainer = build_trainer(cfg, callbacks, logger, paths.checkpoints, interactive=True)
        node = f"node{trainer.node_rank}" if cfg.num_nodes > 1 else None
        resumed = resume is not None
        seconds = params.runtime.system_metrics_seconds
        with (
            system_metrics(run_id, uri, seconds, node, resumed) if rank_zero else nullcontext(),
            preemption_is_resumable(trainer, preemption, paths.checkpoints),
            warnings.catch_warnings(),
        ):
            # the folder holds convpipe's resume record (and, resuming, the checkpoints it
            # resumes from) by design: Lightning's "exists and is not empty" is no news
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
            ckpt = resume.checkpoint if resume else None
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
        # before test(): restoring the best checkpoint also restores its (shorter) history
        history_csv = history.to_csv()
        test = trainer.test(
            model, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False
        )
        costs = cost.summary()
        metrics = {**_summary(trainer, best, test[0]), **costs, "mlflow_run_id": run_id}
        run = RunInfo(run_id, str(getattr(logger, "experiment_id", "")), mask(uri))
        if trainer.is_global_zero:  # under DDP every rank gets here; one writes
            for key, value in costs.items():  # the runs table's cost columns (numbers only)
                if isinstance(value, (int, float)):
                    client.log_metric(run_id, key, float(value))
            _write_outputs(params, best.best_model_path, history_csv, metrics)
            log_artifacts(cast(MLFlowLogger, logger), params)
            run.save(paths.run_info)  # last: evaluate only ever finds a complete run
            client.set_terminated(run_id, "FINISHED")
    return TrainResult(paths.model, metrics, run)


def _tag_init(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    """Record where the weights started from: tags, and a link in the run's description."""
    if not tags:
        return
    for key, value in tags.items():
        client.set_tag(run_id, key, mask(value))
    note = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
    source_run = tags.get(INIT_RUN_TAG)
    experiment = client.get_run(source_run).info.experiment_id if source_run else None
    client.set_tag(run_id, "mlflow.note.content", mask(note + init_note(tags, experiment)))


def _write_outputs(params: Params, best: str, history_csv: str, metrics: dict[str, Any]) -> None:
    paths = params.paths
    with atomic_path(paths.model) as tmp:
        shutil.copyfile(best, tmp)
    write_json(paths.train_metrics, metrics)
    write_text(paths.train_history, history_csv)

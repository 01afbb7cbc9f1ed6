"""The Lightning Trainer that ``train:`` describes, with convpipe's callbacks and plugins."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
)
from lightning.pytorch.loggers.logger import Logger

from convpipe.config.schema import TrainParams
from convpipe.errors import ConvpipeError
from convpipe.models.checkpoint import AtomicCheckpointIO
from convpipe.training.callbacks import (
    EpochHistory,
    EpochLearningRate,
    fine_tuning,
    weight_averaging,
)
from convpipe.training.preemption import (
    InterruptCheckpoint,
    Preemption,
)
from convpipe.training.resume import (
    RngState,
)

# What CNNClassifier logs at epoch level during fit: the metrics train.monitor may name.
# Checkpoint names in paths.checkpoints: the best epoch by train.monitor, and the latest.
BEST, LAST = "best", "last"
# Every metric the model logs per epoch, and the direction in which it improves.
MONITOR_MODES = {
    "train/loss": "min",
    "train/acc": "max",
    "train/objective": "min",
    "train/penalty": "min",
    "val/loss": "min",
    "val/acc": "max",
}
MONITORS = tuple(MONITOR_MODES)


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
        train: the ``train`` section, its ``precision`` resolved (no ``auto``).
        callbacks: every callback (checkpointing only happens through these).
        logger: the MLflow logger, or False.
        root: Lightning's working folder.
        interactive: show the progress bar and model summary (off for tuning trials).
        **options: further ``L.Trainer`` arguments (benchmarks turn validation off with
            ``limit_val_batches=0``); they override the ones derived from ``train``.

    Raises:
        ConvpipeError: If the accelerator, devices, strategy or precision are not usable here.
    """
    if train.precision == "auto":
        raise ValueError(
            "resolve train.precision auto first (convpipe.training.run.resolved_train)"
        )
    settings: dict[str, Any] = {
        "accelerator": train.accelerator,
        "devices": train.devices,
        "strategy": _with_unused_parameters(train, check_strategy(train.strategy)),
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


def _with_unused_parameters(train: TrainParams, strategy: str) -> str:
    """DDP that tolerates parameters without gradients while the backbone is frozen.

    DDP registers the parameters that need gradients when it wraps the model, and expects a
    gradient for each in every step; :class:`convpipe.training.callbacks.FreezeBackbone`
    switches the backbone's off and on again later, which only DDP's
    ``find_unused_parameters`` follows.
    """
    # devices: auto is every GPU there is (one process on a CPU)
    devices = train.devices if isinstance(train.devices, int) else torch.cuda.device_count()
    processes = train.num_nodes * max(1, devices)
    if not train.freeze_epochs or processes < 2 or strategy not in ("auto", "ddp", "ddp_spawn"):
        return strategy
    return f"{'ddp' if strategy == 'auto' else strategy}_find_unused_parameters_true"


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
    """Refuse a monitor the model never logs, or a mode that would keep its worst epoch.

    Lightning would fail mid-training on an unknown metric; ``val/acc`` with ``min`` would
    quietly keep the worst checkpoint.

    Raises:
        ConvpipeError: naming the closest valid metric, or the mode the metric needs.
    """
    if train.monitor in MONITORS:
        wanted = MONITOR_MODES[train.monitor]
        if train.monitor_mode != wanted:
            raise ConvpipeError(
                f"train.monitor_mode is '{train.monitor_mode}' but {train.monitor} improves "
                f"as it goes {'up' if wanted == 'max' else 'down'}",
                "in params.yaml",
                f"set train.monitor_mode: {wanted}",
            )
        return
    close = difflib.get_close_matches(train.monitor, MONITORS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(MONITORS)}"
    raise ConvpipeError(
        f"train.monitor is '{train.monitor}', a metric the model does not log",
        "in params.yaml",
        hint,
    )


def early_stopping(train: TrainParams) -> EarlyStopping:
    """Stop after ``train.patience`` epochs without improving ``train.monitor``."""
    return EarlyStopping(monitor=train.monitor, mode=train.monitor_mode, patience=train.patience)


def trial_callbacks(
    train: TrainParams, *extra: Callback, resumable: Sequence[Callback] = ()
) -> tuple[EpochHistory, list[Callback]]:
    """What a tuning trial trains with: the train stage's callbacks without the best checkpoint.

    The same fine-tuning freeze, weight average, early stopping and learning-rate log as
    :func:`training_callbacks`, so a trial learns as ``dvc repro`` would with its values.

    Args:
        train: The ``train`` section, resolved.
        *extra: The search's own callbacks (pruning, checks), run after the weight average
            (they must see the averaged weights' validation) and before early stopping.
        resumable: What makes the trial resumable (its ``last.ckpt`` writer, the random
            states, the preemption signal), last.

    Returns:
        The per-epoch history (its ``rows`` hold the monitored values) and the full list.
    """
    history = EpochHistory()
    callbacks: list[Callback] = [
        *fine_tuning(train),
        *weight_averaging(train),  # first: validation must see the averaged weights
        *extra,
        early_stopping(train),
        EpochLearningRate(),
        history,
        *resumable,
    ]
    return history, callbacks


def training_callbacks(
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
    early = early_stopping(train)
    lr = EpochLearningRate()
    preemption = Preemption()
    # the average first: validation (and so the checkpoints) must see the averaged weights
    averaging = weight_averaging(train)
    callbacks: list[Callback] = [
        *fine_tuning(train),
        *averaging,
        *[best, last, early, lr, history, RngState(), preemption],
    ]
    return best, history, preemption, callbacks

"""Training callbacks: DVC's history table, MLflow's learning rate, EMA, a frozen backbone."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    WeightAveraging,
)
from torch import Tensor

from convpipe.config.schema import TrainParams
from convpipe.io import write_json, write_text
from convpipe.models.network import backbone_parameters

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


class LiveFiles(Callback):
    """After every epoch, the stage's history CSV and a running ``metrics/train.json``.

    Both written atomically (a temp file, then a rename), so ``dvc exp show`` and ``dvc plots``
    (and DVC's VS Code extension) read a running or queued experiment's progress from the
    files the finished stage leaves, in the same places; the running ``train.json`` holds
    ``"running": true``, the epochs so far, the best monitored value and the last epoch's
    metrics, and the end of the stage replaces it with the final one. Rank 0 writes.
    """

    def __init__(
        self, history: EpochHistory, history_csv: str, metrics_json: str, train: TrainParams
    ) -> None:
        self.history = history
        self.history_csv = history_csv
        self.metrics_json = metrics_json
        self.monitor, self.mode = train.monitor, train.monitor_mode

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rewrite both files with the epochs so far (the history has this one by now)."""
        rows = self.history.rows
        if trainer.sanity_checking or not trainer.is_global_zero or not rows:
            return
        seen = [row[self.monitor] for row in rows if self.monitor in row]
        best = (min if self.mode == "min" else max)(seen) if seen else None
        last = {key: value for key, value in rows[-1].items() if key != "epoch"}
        running = {"running": True, "epochs": len(rows), "monitor": self.monitor, "best": best}
        write_text(self.history_csv, self.history.to_csv())
        write_json(self.metrics_json, {**running, **last})


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


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay for the update after ``updates`` earlier ones: ``min(d, (1+n)/(10+n))``.

    TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` warm-up: the first averages
    follow the weights closely (0.1, 0.18, 0.25, ...), so the random initial weights do not
    linger in the average for ~``1/(1-d)`` steps; from ``n = (10d - 1)/(1 - d)`` on it is ``d``.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _ema_step(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """The EMA update of one group of same-device, same-dtype tensors, as fused ops.

    One ``_foreach_lerp_`` per group (a per-tensor Python function cost convpipe 10 % of a
    plain loop's throughput), with the warmed-up decay (:func:`ema_decay_at`) computed on the
    tensors' device from the update count, so a GPU never waits for the host. Integer buffers
    (batch norm's ``num_batches_tracked``) are copied: a count has no average.
    """

    def update(averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = updates.to(averaged[0].dtype)
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        # A 0-dim tensor weight is accepted at run time; torch's stubs only list Python scalars.
        torch._foreach_lerp_(averaged, current, 1.0 - d)  # type: ignore[call-overload]

    return update


class EMAWeights(WeightAveraging):
    """An EMA of the weights, whose average is what validation and checkpoints see.

    Lightning's weight-averaging callback with an exponential average: after each optimiser
    step the average moves by ``1 - d`` towards the current weights and batch-norm
    statistics, ``d = train.ema_decay`` once warmed up (:func:`ema_decay_at`). Validation runs
    on the average, and every checkpoint stores it as its ``state_dict`` (the raw weights go
    under ``current_model_state``, for resuming), so early stopping, the best checkpoint, the
    test split, evaluate, predict and export all use the averaged weights.

    Lightning's callback would put the raw weights back when any later ``trainer.test``
    restores a checkpoint; here only a resumed ``fit`` does.
    """

    def __init__(self, decay: float) -> None:
        super().__init__(use_buffers=True, multi_avg_fn=_ema_step(decay))
        self.decay = decay

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the raw weights and the average to resume a fit; otherwise keep the EMA."""
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def fine_tuning(train: TrainParams) -> list[Callback]:
    """:class:`FreezeBackbone` when ``train.freeze_epochs`` asks for it, else nothing."""
    return [FreezeBackbone(train.freeze_epochs)] if train.freeze_epochs else []


def weight_averaging(train: TrainParams) -> list[Callback]:
    """``[EMAWeights]`` when ``train.ema_decay`` is above 0, else nothing."""
    return [EMAWeights(train.ema_decay)] if train.ema_decay > 0 else []


class FreezeBackbone(Callback):
    """Train only the head for the first ``epochs`` epochs, then everything (fine-tuning).

    During those epochs the backbone's conv weights take no gradient (autograd does not even
    compute it, so the epochs are cheaper); its batch-norm scales and shifts keep training
    and its running statistics keep adapting to the new data, as fastai's ``freeze`` does. The
    choice is made at the start of every epoch from the epoch number alone, so a resumed
    training freezes exactly as one that never stopped. Parameters that were never trained
    (fixed whitening filters, fixed BN scales) stay as they are.

    Args:
        epochs: ``train.freeze_epochs``.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self._frozen: list[torch.nn.Parameter] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Freeze before epoch ``epochs``, unfreeze from it on."""
        if trainer.current_epoch < self.epochs:
            if not self._frozen:
                net = getattr(pl_module, "net", pl_module)
                self._frozen = [
                    p for p in backbone_parameters(net) if p.requires_grad and p.ndim > 1
                ]
                for parameter in self._frozen:
                    parameter.requires_grad_(False)
        elif self._frozen:
            for parameter in self._frozen:
                parameter.requires_grad_(True)
            self._frozen = []

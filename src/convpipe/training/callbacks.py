"""Per-epoch callbacks: the history table for DVC plots and the learning rate for MLflow."""

from __future__ import annotations

import csv
import io
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
)

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

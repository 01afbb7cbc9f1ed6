"""What a training cost: wall time, images/s, training FLOPs and the FLOP/s achieved.

:class:`TrainingCost` counts the training images each process stepped through and the seconds
of the training batches (each epoch from its start to its last training batch: data loading
included, validation not), and measures the training FLOPs of one image once, with
``torch.utils.flop_counter`` on one forward + backward of a copy of the model (2 FLOPs a
multiply-add, so the figure matches the forward FLOPs of ``convpipe summary`` times about 3).
Per epoch it logs ``perf/images_per_s`` and ``perf/gflops_per_s`` (to MLflow, beside the
epoch's metrics); at the end :meth:`TrainingCost.summary` gives the totals that go into
``metrics/train.json`` (so ``dvc exp show`` puts accuracy and cost side by side) and onto the
MLflow run. Counts are kept in checkpoints, so a resumed training adds to them.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from convpipe.models.module import CNNClassifier

__all__ = ["PER_EPOCH", "TrainingCost", "training_flops_per_image"]

#: The per-epoch metrics logged (MLflow), with the epoch as their step.
PER_EPOCH = ("perf/images_per_s", "perf/gflops_per_s")
#: Images in the batch the FLOPs are counted on (per image after dividing).
COUNT_BATCH = 2


def training_flops_per_image(model: CNNClassifier) -> float:
    """FLOPs of one training step per image: forward, loss and backward, on a copy.

    The model, its gradients and the random state are left as they are; the count does not
    depend on the weights, the precision or the batch size (convolutions and matrix products
    scale with it).
    """
    # the random state put back: dropout and the input draw from it, and a resumed training
    # (its state restored from the checkpoint before this runs) must draw what it would have
    # the network alone is copied: the LightningModule holds its Trainer during a fit, and
    # with it the data, loggers and loops a deep copy would duplicate
    with torch.random.fork_rng(devices=[]):
        net = copy.deepcopy(model.net).train()
        x = torch.randn(COUNT_BATCH, *model.input_shape, device=model.device)
        with FlopCounterMode(display=False) as counter:
            net(x).float().sum().backward()  # any scalar: backward costs the same
    return counter.get_total_flops() / COUNT_BATCH


class TrainingCost(Callback):
    """Images, seconds and FLOPs of the training batches (see the module)."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.images = 0
        self.seconds = 0.0
        self.flops_per_image = 0.0
        self._epoch_start = 0.0
        self._last_batch_end = 0.0
        self._epoch_images = 0

    def state_dict(self) -> dict[str, Any]:
        """The totals so far (a resumed training adds to them)."""
        return {"images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the totals of the epochs before an interruption."""
        self.images = int(state_dict["images"])
        self.seconds = float(state_dict["seconds"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count one image's training FLOPs (rank 0 does; the same on every rank)."""
        if isinstance(pl_module, CNNClassifier):
            self.flops_per_image = training_flops_per_image(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock."""
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_images = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """Count the batch's images (every rank's: this rank's times the world size)."""
        self._epoch_images += int(batch[0].shape[0]) * trainer.world_size
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the epoch to the totals; log its throughput."""
        seconds = max(self._last_batch_end - self._epoch_start, 1e-9)
        self.images += self._epoch_images
        self.seconds += seconds
        rate = self._epoch_images / seconds
        pl_module.log(PER_EPOCH[0], rate, on_epoch=True, sync_dist=False, rank_zero_only=True)
        gflops = rate * self.flops_per_image / 1e9
        pl_module.log(PER_EPOCH[1], gflops, on_epoch=True, sync_dist=False, rank_zero_only=True)

    def summary(self) -> dict[str, Any]:
        """The totals for ``metrics/train.json`` and the MLflow run."""
        rate = self.images / self.seconds if self.seconds else 0.0
        return {
            "cost/train_seconds": round(self.seconds, 3),
            "cost/train_images": self.images,
            "cost/images_per_s": round(rate, 2),
            "cost/train_tflops": round(self.images * self.flops_per_image / 1e12, 6),
            "cost/gflops_per_s": round(rate * self.flops_per_image / 1e9, 3),
            "cost/precision": self.precision,
        }

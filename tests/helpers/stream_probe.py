"""A Lightning training that records which images each DDP rank streamed, epoch by epoch.

Run as a script (Lightning's DDP launcher starts it once per process)::

    python tests/helpers/stream_probe.py PARAMS_YAML OUT_DIR DEVICES EPOCHS

It trains a one-weight model on the real :class:`~convpipe.data.datamodule.ConvDataModule`
of ``PARAMS_YAML`` (batches as stored: uint8) and each rank writes ``OUT_DIR/rank<r>.json``:
``{epoch: [image numbers]}`` (:func:`tests.helpers.datagen.image_number`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from convpipe.config.schema import load_params
from convpipe.data.datamodule import ConvDataModule


class Probe(L.LightningModule):
    """One weight; remembers the numbers of the uint8 images of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images = batch[0].numpy().reshape(len(batch[0]), -1).astype(np.int64)
        numbers = images[:, 0] + 256 * images[:, 1]
        self.seen.setdefault(self.current_epoch, []).extend(numbers.tolist())
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch[0].float().mean()).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(params_file: str, out: str, devices: int, epochs: int) -> None:
    params = load_params(params_file)
    datamodule = ConvDataModule(
        params.paths.prepared,
        None,
        params.train.batch_size,
        params.runtime.num_workers,
        False,
        params.base.seed,
        batch_transform="device",
        resident=False,
    )
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=datamodule)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(probe.seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

"""Resuming a killed training: what was running, whether it may continue, and its RNG state.

``paths.checkpoints`` is not a DVC output, so ``dvc repro`` never deletes it. While a training
runs, ``resume.json`` there records its MLflow run id and a fingerprint of everything that
shapes the result; ``last.ckpt`` is rewritten after every epoch. The next training with the
same fingerprint continues from ``last.ckpt`` in the same MLflow run; one with other params
refuses, naming what changed. A finished or failed training removes ``resume.json``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.io import write_json
from convpipe.models.checkpoint import check_hyperparameters, read_checkpoint

log = logging.getLogger("convpipe")

STATE_FILE = "resume.json"

LAST_CHECKPOINT = "last.ckpt"


def fingerprint(params: Params, content_hash: str, train_size: int) -> dict[str, Any]:
    """Everything a resumed training must share with the one it continues."""
    return {
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json"),
        "augment.online": params.augment.online,
        "base.seed": params.base.seed,
        "data.content_hash": content_hash,
        "data.train_size": train_size,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two fingerprints."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changed.append(key)
    return changed


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted training stopped."""

    checkpoint: str
    run_id: str


def find_resume_point(folder: str | Path, current: dict[str, Any]) -> ResumePoint | None:
    """The interrupted training to continue, if there is one and it is compatible.

    A ``last.ckpt`` that cannot be read (a kill while it was written) is reported in one
    line and the training starts over.

    Raises:
        ConvpipeError: if the interrupted training had other params, naming them, or its
            checkpoint holds hyperparameters convpipe never writes.
    """
    folder = Path(folder)
    state_file, last = folder / STATE_FILE, folder / LAST_CHECKPOINT
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        saved, run_id = state["fingerprint"], str(state["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # unreadable record: nothing trustworthy to resume
    if not last.is_file():
        return None  # killed before the first epoch ended: start over
    changed = _differences(saved, current)
    if changed:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise ConvpipeError(
            f"an interrupted training was found with other params ({shown} changed), so "
            "its checkpoint cannot be resumed",
            f"in {folder}",
            f"restore those params to resume it, or delete {folder} to start over",
        )
    try:
        checkpoint = read_checkpoint(last)
    except ConvpipeError as exc:  # killed while it was written: a truncated file resumes nothing
        log.warning(
            "%s unreadable (%s): starting the training over (run %s stays as it was left)",
            last,
            exc.what,
            run_id,
        )
        return None
    check_hyperparameters(checkpoint, last)  # a checkpoint convpipe never wrote: never resumed
    return ResumePoint(str(last), run_id)


def start_record(folder: str | Path, run_id: str, current: dict[str, Any]) -> None:
    """Record a training that starts from scratch (any older checkpoints are gone)."""
    write_json(Path(folder) / STATE_FILE, {"run_id": run_id, "fingerprint": current})


def clear_record(folder: str | Path) -> None:
    """The training ended (finished or failed for good): nothing to resume."""
    (Path(folder) / STATE_FILE).unlink(missing_ok=True)


class RngState(Callback):
    """Keeps torch's, numpy's and Python's random states in checkpoints.

    Restoring them on resume makes dropout (and any other draw) continue exactly where the
    interrupted run was, so a resumed training follows the same path as an uninterrupted one.
    Everything is stored as tensors, lists and numbers: checkpoints stay ``weights_only`` safe.
    A checkpoint from part-way through an epoch is restored again just before its next
    batch: creating the epoch's data iterator on resume draws from torch's generator, which
    the uninterrupted run did before that epoch's first batch, not there.
    """

    def __init__(self) -> None:
        self._mid_epoch: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The current random states."""
        kind, keys, pos, has_gauss, gauss = cast(tuple[Any, ...], np.random.get_state())
        return {
            "torch": torch.get_rng_state(),
            "numpy": [str(kind), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": _to_lists(random.getstate()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the random states saved by :meth:`state_dict`."""
        self._mid_epoch = state_dict
        self._restore(state_dict)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Restore once more at the first batch after a resume from part-way through an epoch."""
        state, self._mid_epoch = self._mid_epoch, None
        if state is not None and trainer.fit_loop.epoch_loop.batch_progress.current.completed:
            self._restore(state)

    @staticmethod
    def _restore(state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _to_lists(state: Any) -> Any:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]

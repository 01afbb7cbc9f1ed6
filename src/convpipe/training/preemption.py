"""Scheduler signals before preemption: save the batch reached, requeue on SLURM.

A scheduler's warning before preemption (SIGTERM, or SLURM's ``--signal=USR1@<seconds>``)
stops the training after the batch in progress; ``last.ckpt`` then holds that moment,
part-way through the epoch, and the rerun continues from the next batch
(:class:`Preemption`, :class:`InterruptCheckpoint`). Ctrl+C can land inside an optimiser
step, so it keeps the ``last.ckpt`` of the last finished epoch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from convpipe.errors import Preempted
from convpipe.training.resume import LAST_CHECKPOINT

log = logging.getLogger("convpipe")

REQUEUE_SIGNAL = signal.SIGUSR1  # what `#SBATCH --signal=USR1@90` sends before the time limit


class InterruptCheckpoint(ModelCheckpoint):
    """The ``last.ckpt`` writer: after every epoch, and on an interruption part-way through one.

    Lightning answers a preemption signal (:class:`Preemption`) after the batch in
    progress, so that checkpoint holds a consistent state. Anything else writes nothing: a
    Ctrl+C may have stopped an optimiser step half-way, and a training that failed for good
    is never resumed.
    """

    def __init__(self, dirpath: str, filename: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            save_on_exception=True,
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save the state reached if a preemption signal raised ``exception``."""
        interrupted = (
            isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING
        )
        if interrupted and self._should_save_on_exception(trainer):
            filepath = self.format_checkpoint_name(metrics=self._monitor_candidates(trainer))
            self._save_checkpoint(trainer, filepath)
            log.info("interrupted: saved the state reached to %s", filepath)


class Preemption(Callback):
    """Treats SIGUSR1 like SIGTERM, and remembers which of them stopped the training.

    Lightning answers SIGTERM by raising ``SIGTERMException`` after the batch in progress
    (on every DDP rank at once). SLURM's ``--signal=USR1@<seconds>`` warning gets the same
    treatment here instead of Lightning's own requeue handler, which would mark the MLflow
    run FINISHED and write a second kind of checkpoint: convpipe keeps one ``last.ckpt`` and
    one run status, and requeues the job itself (:func:`preemption_is_resumable`).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the SIGUSR1 handler (Lightning installs its SIGTERM handler after this)."""
        self.signal = None
        if threading_is_main():
            self._previous = signal.signal(REQUEUE_SIGNAL, self._on_requeue_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put back the SIGUSR1 handler found at the start."""
        if self._previous is not None and threading_is_main():
            signal.signal(REQUEUE_SIGNAL, self._previous)
            self._previous = None

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum)
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's, during the fit
        if callable(handler):
            handler(signum, frame)

    def received(self) -> signal.Signals:
        """The signal that stopped the training (SIGTERM unless SIGUSR1 came)."""
        return self.signal or signal.SIGTERM


def threading_is_main() -> bool:
    """Whether signal handlers can be set here (only the main thread may)."""
    return threading.current_thread() is threading.main_thread()


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); say what happened."""
    job = os.environ.get("SLURM_JOB_ID", "")
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        job = f"{array}_{task}"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"requeueing SLURM job {job} failed ({type(exc).__name__}): requeue it by hand"
    if done.returncode != 0:
        reason = " ".join(done.stderr.split())[:200] or f"exit {done.returncode}"
        return f"requeueing SLURM job {job} failed ({reason}): requeue it by hand"
    return f"SLURM job {job} is requeued and resumes from there"


#: What the user does after a preempted train stage.
RERUN_TRAIN = "rerun `dvc repro train` to resume from there"


@contextmanager
def preemption_is_resumable(
    trainer: L.Trainer, preemption: Preemption, folder: str, todo: str = RERUN_TRAIN
) -> Iterator[None]:
    """Turn Lightning's ``SIGTERMException`` into :class:`Preempted`, requeueing on SLURM.

    By then :class:`InterruptCheckpoint` has saved ``last.ckpt``. On SLURM, the requeue
    signal makes global rank 0 requeue the job, whose rerun finds the resume record.

    Args:
        trainer: The Trainer whose fit this covers.
        preemption: Its :class:`Preemption` callback (which signal came).
        folder: Where ``last.ckpt`` was saved.
        todo: What resumes it (said in the error unless SLURM requeues the job).
    """
    try:
        yield
    except SIGTERMException:
        received = preemption.received()
        loop = trainer.fit_loop.epoch_loop.batch_progress.current
        if SLURMEnvironment.detect() and received == REQUEUE_SIGNAL:
            todo = requeue_slurm_job() if trainer.is_global_zero else "rank 0 requeues the job"
        raise Preempted(
            f"stopped by {received.name} at epoch {trainer.current_epoch} after batch "
            f"{loop.completed} of {trainer.num_training_batches}",
            f"the state is saved in {Path(folder) / LAST_CHECKPOINT}",
            todo,
            int(received),
        ) from None

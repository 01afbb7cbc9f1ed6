"""One trial: train with the sampled values and report the best validation value."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError, Preempted
from convpipe.inference.cost import COST_METRICS, measure_costs
from convpipe.models.module import CNNClassifier
from convpipe.tracking.runs import RunLogger
from convpipe.training.resume import ResumePoint, find_resume_point, fingerprint, start_record
from convpipe.training.run import build_datamodule, fit_trial
from convpipe.tuning.campaign import Campaign
from convpipe.tuning.liveness import REASON_ATTR, heartbeat
from convpipe.tuning.objectives import (
    COSTS_ATTR,
    direction_of,
    named_metrics,
    needs_costs,
    objective_names,
    trial_scores,
)
from convpipe.tuning.retry import (
    RESTARTED_ATTR,
    attempts,
    code_digest,
    first_number,
    requeue,
    trial_folder,
)
from convpipe.tuning.space import best_value, diverged, make_sampler, suggest, with_values

log = logging.getLogger("convpipe")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners: a campaign prints one line per trial instead."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class FiniteCheck(Callback):
    """A multi-objective trial's guard: no pruner, but a nan/inf ``monitor`` still fails it."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop with an error on a non-finite monitor."""
        score = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and score is not None and not math.isfinite(float(score)):
            raise diverged(self.monitor, float(score), pl_module.current_epoch)


class CostProbe(Callback):
    """Measure the trial's network (:func:`convpipe.inference.cost.measure_costs`) at fit start.

    The costs do not depend on the weights, so they are known before training, and stored on
    the trial (:data:`~convpipe.tuning.objectives.COSTS_ATTR`) even if it is pruned or fails.
    Rank 0 measures; the model is timed in fp32 in eval mode, as an exported model runs.
    """

    def __init__(self, trial: Trial) -> None:
        self.trial = trial
        self.costs: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure and store the costs."""
        if not trainer.is_global_zero:
            return
        measured = measure_costs(cast(CNNClassifier, pl_module))
        self.costs = {name: float(getattr(measured, name)) for name in COST_METRICS}
        self.trial.set_user_attr(COSTS_ATTR, self.costs)


class Abandoned(Callback):
    """Stop the trial at the next batch once a worker took this one for dead.

    The heartbeat sets ``lost`` when it finds the trial no longer RUNNING: its retry may be
    training on from the same checkpoint folder already. Spawned DDP ranks get no event (it
    cannot be pickled); the campaign process still leaves the run and folder alone.
    """

    def __init__(self, trial: Trial, lost: threading.Event) -> None:
        self.number = trial.number
        self.lost: threading.Event | None = lost

    def __getstate__(self) -> dict[str, Any]:
        return {"number": self.number, "lost": None}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """Raise once the trial is lost (no checkpoint is written for it)."""
        if self.lost is not None and self.lost.is_set():
            raise ConvpipeError(
                f"trial {self.number} was taken for dead by another worker and queued to run again",
                "this worker was silent for longer than 3 heartbeats",
                "nothing to do: its retry goes on from the checkpoint (raise "
                "tune.heartbeat_seconds if such pauses are normal here)",
            )


class FinitePruning(PyTorchLightningPruningCallback):
    """Optuna's pruning callback, but a nan/inf monitor fails the trial instead of pruning it."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop with an error on a non-finite monitor, else report it to the pruner."""
        score = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and score is not None and not math.isfinite(float(score)):
            raise diverged(self.monitor, float(score), pl_module.current_epoch)
        super().on_validation_end(trainer, pl_module)


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ConvpipeError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:2000]


#: What resumes a preempted trial (said in its error line).
RERUN_TUNE = "rerun `convpipe tune`: the trial goes on from there"


@dataclass
class TrialRunner:
    """The objective: sample, train on train/val, return the best monitored value.

    Each trial's MLflow child run ends with the outcome: COMPLETE, PRUNED, or FAIL with the
    reason (KILLED on an interrupt or a preemption, which :mod:`~convpipe.tuning.retry`
    resumes in the same run).
    """

    params: Params
    campaign: Campaign

    def __call__(self, trial: Trial) -> float | list[float]:
        """Run one trial, or go on with a retried one (a heartbeat covers all of it).

        Raises:
            optuna.TrialPruned: the pruner stopped it.
            Exception: whatever failed it (a ConvpipeError for divergence, Preempted).
        """
        tune, campaign = self.params.tune, self.campaign
        with heartbeat(campaign.study, trial._trial_id, tune.heartbeat_seconds) as lost:
            values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
            params = self.trial_params(values)
            stored = trial.study._storage.get_trial(trial._trial_id)
            folder = trial_folder(self.params, campaign.key, stored)
            current = {**fingerprint(params, *self._data(params)), "code": code_digest()}
            resume = self._resume_point(trial, stored, folder, current)
            run_id = campaign.start_trial(
                trial, values, resume.run_id if resume else None, attempts(stored)
            )
            try:
                if resume is None:
                    shutil.rmtree(folder, ignore_errors=True)
                    start_record(folder, run_id, current)
                else:
                    self._carry_over(trial, stored)
                value = self.fit(trial, params, run_id, folder, resume, Abandoned(trial, lost))
            except BaseException as exc:
                self._ended(trial, exc, run_id, folder)
                raise
            if _ours(trial):  # else a worker took this one for dead: its retry owns them now
                names = objective_names(self.params)
                scores = value if isinstance(value, list) else [value]
                for name, score in zip(names, scores, strict=True):
                    campaign.client.log_metric(run_id, f"objective/{name}", score)
                campaign.client.log_metric(run_id, "objective", scores[0])
                campaign.end_trial(run_id, "COMPLETE")
                shutil.rmtree(folder, ignore_errors=True)
        return value

    def _ended(self, trial: Trial, exc: BaseException, run_id: str, folder: Path) -> None:
        """Close the child run as ``exc`` ended the trial; keep the folder if it may go on.

        Nothing is touched for a trial another worker took for dead: its retry may already
        train on in that run and from that folder.
        """
        try:
            ours = _ours(trial)
        except Exception:  # the storage is what failed: the run is still this worker's
            ours = True
        if not ours:
            return
        if isinstance(exc, optuna.TrialPruned):
            self.campaign.end_trial(run_id, "PRUNED")
        elif isinstance(exc, (KeyboardInterrupt, SystemExit, Preempted)):  # resumable
            reason = _reason(exc) if isinstance(exc, Preempted) else "interrupted"
            self.campaign.end_trial(run_id, "FAIL", reason, status="KILLED")
            return
        else:
            self.campaign.end_trial(run_id, "FAIL", _reason(exc))
        shutil.rmtree(folder, ignore_errors=True)

    def dead(self, trial: FrozenTrial) -> None:
        """A trial whose worker went silent, marked FAIL: close its run, queue it to go on."""
        self.campaign.end_stale(trial)
        self.retry(trial)

    def retry(self, trial: FrozenTrial) -> bool:
        """Queue ``trial`` (FAIL: its worker died, was preempted or interrupted) to go on."""
        folder = trial_folder(self.params, self.campaign.key, trial)
        return requeue(self.campaign.study, trial, self.params, folder)

    def trial_params(self, values: Mapping[str, Any]) -> Params:
        """The params a trial trains with: its values, ``tune.max_epochs``, its strategy."""
        fixed = {"train.max_epochs": self.params.tune.max_epochs, **trial_strategy(self.params)}
        return with_values(self.params, {**values, **fixed})

    @staticmethod
    def _data(params: Params) -> tuple[str, int]:
        datamodule = build_datamodule(params)
        return datamodule.manifest.content_hash, datamodule.train_size

    @staticmethod
    def _resume_point(
        trial: Trial, stored: FrozenTrial, folder: Path, current: dict[str, Any]
    ) -> ResumePoint | None:
        """Where a retried trial goes on from; None for a new one, or one that starts over."""
        if not attempts(stored):
            return None
        first = first_number(stored)
        why = "no checkpoint was saved"
        try:
            point = find_resume_point(folder, current)
        except ConvpipeError as exc:  # other params, data or code since: never mixed
            point, why = None, exc.what
        if point is None:
            log.warning("trial %d (a retry of trial %d) starts over: %s", trial.number, first, why)
            trial.set_user_attr(RESTARTED_ATTR, why)
            return None
        log.info("trial %d goes on with trial %d from %s", trial.number, first, point.checkpoint)
        return point

    @staticmethod
    def _carry_over(trial: Trial, stored: FrozenTrial) -> None:
        """Report the earlier attempts' epochs again: the pruner judges the whole history.

        Every attempt's values, later ones winning: an attempt killed before it re-reported
        holds none of the epochs its checkpoint has.
        """
        if len(trial.study.directions) > 1:  # no pruning, no intermediate values
            return
        storage, earlier = trial.study._storage, {}
        for number in attempts(stored):
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                trial.study._study_id, number
            )
            earlier.update(storage.get_trial(trial_id).intermediate_values)
        for step, value in sorted(earlier.items()):
            trial.report(value, step)

    def fit(
        self,
        trial: Trial,
        params: Params,
        run_id: str,
        folder: Path,
        resume: ResumePoint | None,
        abandoned: Callback,
    ) -> float | list[float]:
        """Train with the trial's ``params``; score the trial on ``tune.objectives``.

        One objective: pruned (or failed on nan) on ``train.monitor`` as before. Several: no
        pruning, a nan still fails it. Costs are measured when an objective or a constraint
        names one; the constraints' violations are stored on the trial.
        """
        monitor = params.train.monitor
        names = objective_names(params)
        single = len(names) == 1
        pruning = FinitePruning(trial, monitor=monitor) if single else None
        guard: Callback = pruning if pruning is not None else FiniteCheck(monitor)
        probe = CostProbe(trial) if needs_costs(params) else None
        extra = [guard, SameValuesOnEveryRank(trial), abandoned, *([probe] if probe else [])]
        logger = RunLogger(tracking_uri=self.campaign.uri, run_id=run_id)
        checkpoint = resume.checkpoint if resume else None
        with quiet_lightning():
            _, rows = fit_trial(params, extra, logger, str(folder), checkpoint, RERUN_TUNE)
        if pruning is not None:
            pruning.check_pruned()  # under DDP the decision arrives here, not as an exception
        stored = trial.study._storage.get_trial(trial._trial_id)  # what spawned ranks wrote
        if not rows:
            # spawned DDP ranks kept their history; the pruning callback stored every epoch's
            # value of the monitor (the only metric a DDP trial can be scored on)
            rows = [{monitor: value} for value in stored.intermediate_values.values()]
        best = {  # each validation metric an objective or a constraint names: its best epoch
            name: best_value(
                rows, name, "min" if direction_of(name, params) == "minimize" else "max"
            )
            for name in named_metrics(params)
            if name not in COST_METRICS
        }
        costs = stored.user_attrs.get(COSTS_ATTR, {})
        scores, violations = trial_scores(best, costs, params)
        for bound, violation in zip(params.tune.constraints, violations, strict=True):
            trial.set_constraint(str(bound), violation)  # what the samplers read
        return scores[0] if single else scores


def trial_strategy(params: Params) -> dict[str, str]:
    """The strategy override a multi-process trial needs.

    ``ddp`` relaunches the whole command in every rank for each ``fit``, which cannot work
    inside a campaign loop; ``ddp_spawn`` starts the ranks from this process instead, so the
    values are sampled once, here, and handed to every rank with the model.
    """
    devices = params.train.devices
    multi = devices == "auto" or int(devices) > 1 or params.train.num_nodes > 1
    if multi and params.train.strategy in ("auto", "ddp"):
        return {"train.strategy": "ddp_spawn"}
    return {}


class SameValuesOnEveryRank(Callback):
    """Under DDP, prove that every rank trains with the values sampled once for the trial.

    Each rank gathers a digest of its hyperparameters; any difference stops the trial. Rank 0
    records how many ranks agreed in the trial's ``ddp_ranks_agreed`` user attribute.
    """

    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compare the hyperparameter digests of all ranks."""
        if trainer.world_size < 2:
            return
        text = json.dumps(dict(pl_module.hparams), sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        gathered = trainer.strategy.all_gather(torch.tensor([digest], dtype=torch.int64))
        if torch.unique(gathered).numel() != 1:
            raise ConvpipeError(
                "DDP ranks of one trial train with different hyperparameters",
                f"in trial {self.trial.number}",
                "report this as a convpipe bug",
            )
        if trainer.is_global_zero:
            self.trial.set_user_attr("ddp_ranks_agreed", trainer.world_size)


#: Trial user attribute: which worker ran it, on what (``convpipe tune --workers`` pins them).
WORKER_ATTR = "worker"


def worker_identity() -> dict[str, Any]:
    """This worker's host, pid, the CPU cores it may use and the GPUs it sees."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cpus": cpus,
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def run_trial(study: optuna.Study, runner: TrialRunner) -> FrozenTrial:
    """Ask for a trial (a queued retry first), run it, tell its outcome; returns it as stored.

    Raises:
        KeyboardInterrupt: after recording the trial FAIL and queueing it to run again (also
            for Lightning's exit on Ctrl+C).
        Preempted: likewise, for SIGTERM or SIGUSR1 (its exit code says which).
    """
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, worker_identity())
    study.sampler = make_sampler(runner.params.tune, runner.params.base.seed, trial.number)
    value: float | list[float] | None = None
    try:
        value = runner(trial)
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except Preempted as exc:
        _stopped(study, trial, runner, _reason(exc))
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        _stopped(study, trial, runner, "interrupted")
        raise KeyboardInterrupt from exc
    except Exception as exc:
        log.debug("trial %d failed", trial.number, exc_info=True)
        with contextlib.suppress(Exception):  # failed by a worker that took this one for dead
            trial.set_user_attr(REASON_ATTR, _reason(exc))
        state = TrialState.FAIL
    # skip_if_finished: a worker that took this one for dead failed it (and queued its retry)
    return study.tell(trial, value, state=state, skip_if_finished=True)


def _ours(trial: Trial) -> bool:
    """Whether ``trial`` is still RUNNING, i.e. no worker took this one for dead meanwhile."""
    return trial.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def _stopped(study: optuna.Study, trial: Trial, runner: TrialRunner, reason: str) -> None:
    """A trial stopped from outside: FAIL, and queued to go on from its checkpoint.

    Only the process whose change to FAIL succeeds queues the retry, so a worker that is
    stopped just as another takes it for dead never queues it twice (nor not at all).
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:  # finished meanwhile: the worker that failed it queued the retry
        return
    try:
        runner.retry(storage.get_trial(trial._trial_id))
    except Exception as exc:  # already stopping: say it, the stop is what to report
        log.warning("trial %d could not be queued to run again: %s", trial.number, exc)

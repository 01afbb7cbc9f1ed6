"""Trials stopped by a dead worker, a preemption signal or Ctrl+C: run again from their checkpoint.

Every trial keeps a folder under ``paths.tuning_checkpoints`` (``<study>-<key>/trial-<n>``)
with ``last.ckpt``, rewritten after each epoch and on SIGTERM/SIGUSR1, and ``resume.json``:
its MLflow child run and a fingerprint of what shaped it (params, data, convpipe's code).

A trial that did not end by itself — its worker went silent (no heartbeat), was preempted or
interrupted — is marked FAIL and queued again as a WAITING trial with the same params, in
Optuna's own convention (system attrs ``failed_trial`` and ``retry_history``, as
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback` writes them and optuna-dashboard
shows), at most ``tune.retries`` times and only while the campaign still needs trials. The
next worker to ask for a trial gets it, trains on from the checkpoint in the first trial's
folder, in the first trial's MLflow child run, with the earlier epochs' values reported to
the pruner again. Only the retry that finishes counts towards ``tune.n_trials``: the failed
attempts are FAIL, which Optuna and convpipe never count. A checkpoint trained with other
params, data or code is not resumed: the retry starts over in a new child run and says why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

import convpipe
from convpipe.config.schema import Params
from convpipe.tuning.campaign import RUN_ATTR
from convpipe.tuning.space import COUNTED

__all__ = [
    "FAILED_TRIAL",
    "RESTARTED_ATTR",
    "RETRY_HISTORY",
    "attempts",
    "code_digest",
    "first_number",
    "requeue",
    "trial_folder",
]

log = logging.getLogger("convpipe")

#: Optuna's system attrs for a retried trial: the first attempt's number, and every attempt's.
FAILED_TRIAL, RETRY_HISTORY = "failed_trial", "retry_history"
#: User attr of a retry that could not go on from its checkpoint: why it started over.
RESTARTED_ATTR = "restarted"
#: What a retry inherits from the attempt before it: its MLflow child run. (Not its heartbeat,
#: which would make it look dead at once, nor its fail reason, which is the old attempt's.)
INHERITED_ATTRS = (RUN_ATTR,)


def first_number(trial: FrozenTrial) -> int:
    """The number of the first attempt of ``trial`` (its own, unless it is a retry)."""
    return int(trial.system_attrs.get(FAILED_TRIAL, trial.number))


def attempts(trial: FrozenTrial) -> list[int]:
    """The numbers of the attempts before ``trial``, first first (empty unless a retry)."""
    return [int(n) for n in trial.system_attrs.get(RETRY_HISTORY, [])]


def trial_folder(params: Params, study_key: str, trial: FrozenTrial) -> Path:
    """Where ``trial`` and all its retries keep ``last.ckpt`` and ``resume.json``."""
    study = f"{params.tune.study_name}-{study_key[:8]}"
    return Path(params.paths.tuning_checkpoints) / study / f"trial-{first_number(trial)}"


@functools.cache
def code_digest() -> str:
    """A digest of convpipe's Python sources: a retry of other code starts over.

    Read once per process: a worker's code does not change under it.
    """
    digest = hashlib.sha256()
    package = Path(convpipe.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def requeue(study: optuna.Study, trial: FrozenTrial, params: Params, folder: Path) -> bool:
    """Queue ``trial`` (FAIL, not by its own fault) to run again with the same params.

    Not when it has been tried ``tune.retries`` times after its first attempt, nor when the
    campaign already has its ``tune.n_trials``: then its checkpoint folder is removed.

    Returns:
        Whether a retry was queued.
    """
    history = [*attempts(trial), trial.number]
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    if len(history) > params.tune.retries or counted >= params.tune.n_trials:
        why = "its retries are used up" if counted < params.tune.n_trials else "budget met"
        log.info("trial %d is not run again (%s)", trial.number, why)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={k: trial.user_attrs[k] for k in INHERITED_ATTRS if k in trial.user_attrs},
            system_attrs={FAILED_TRIAL: first_number(trial), RETRY_HISTORY: history},
        )
    )
    log.info("trial %d is queued to run again from its last checkpoint", trial.number)
    return True

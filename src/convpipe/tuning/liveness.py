"""Heartbeats of running trials, and failing the trials whose worker died."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("convpipe")

HEARTBEAT_ATTR = "convpipe_heartbeat"

REASON_ATTR = "fail_reason"


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial_id: int, seconds: float) -> Iterator[threading.Event]:
    """Beat ``time.time()`` into the trial's user attrs now and every ``seconds`` until exit.

    Yields:
        An event set when the trial is found no longer RUNNING at a beat: a worker took this
        one for dead (a pause longer than the grace) and marked it FAIL, and its retry may
        already train on from the checkpoint, so this worker must stop touching it.
    """
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(seconds):
            with contextlib.suppress(Exception):  # a missed beat only delays stale detection
                if study._storage.get_trial(trial_id).state != TrialState.RUNNING:
                    lost.set()
                    return
                study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())

    study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
    thread = threading.Thread(target=beat, name="convpipe-heartbeat", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def last_beat(trial: FrozenTrial) -> float:
    """When ``trial`` last beat (its start, before the first beat)."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return float(trial.user_attrs.get(HEARTBEAT_ATTR, started))


def fail_stale_trials(
    study: optuna.Study, grace: float, on_fail: Callable[[FrozenTrial], None]
) -> list[int]:
    """Mark FAIL every RUNNING trial whose heartbeat is older than ``grace`` seconds.

    Args:
        study: the study to look at.
        grace: seconds of silence after which a trial's worker is taken for dead.
        on_fail: called with each trial this call failed, as stored after that (e.g. to
            close its MLflow run).

    Returns:
        The numbers of the trials this call marked FAIL.
    """
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        silent = now - last_beat(trial)
        if silent <= grace:
            continue
        reason = f"worker stopped: no heartbeat for {silent:.0f}s"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # it finished, or another worker failed it first
            continue
        failed.append(trial.number)
        on_fail(study._storage.get_trial(trial._trial_id))  # as stored: FAIL, with the reason
        log.warning("trial %d marked FAIL: %s", trial.number, reason)
    return failed

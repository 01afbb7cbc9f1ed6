"""The loop one tuning worker runs: ask, train, tell, until the campaign is done."""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError, Preempted
from convpipe.redact import mask
from convpipe.training.run import build_datamodule
from convpipe.training.trainer import check_monitor
from convpipe.tuning.campaign import Campaign
from convpipe.tuning.liveness import REASON_ATTR, fail_stale_trials, last_beat
from convpipe.tuning.objective import TrialRunner, run_trial
from convpipe.tuning.objectives import check_objectives
from convpipe.tuning.reports import write_reports
from convpipe.tuning.space import COUNTED, check_space
from convpipe.tuning.storage import load_study

log = logging.getLogger("convpipe")

#: A campaign stops (with an error) after this many failed trials in a row: the setup is broken.
MAX_FAILED_IN_A_ROW = 5

#: Seconds between looks at the study while waiting for other workers' trials.
POLL_SECONDS = 1.0
#: A trial silent for this many heartbeats is dead: one late beat (a long epoch, a busy
#: storage) is not, three in a row are.
STALE_BEATS = 3
#: A trial whose last beat is older than this many beats may be dead: wait for it to be
#: found stale before leaving, rather than leave it RUNNING.
LATE_BEATS = 2


def _report_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """One progress line per finished trial."""
    took = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else 0.0
    )
    value = "/".join(f"{v:.5g}" for v in trial.values) if trial.values else "-"
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    extra = f" ({trial.user_attrs[REASON_ATTR]})" if REASON_ATTR in trial.user_attrs else ""
    log.info(
        "trial %d %s value=%s in %.1fs [%d counted]%s",
        trial.number,
        trial.state.name,
        value,
        took,
        done,
        extra,
    )


def _next_step(study: optuna.Study, total: int) -> Literal["run", "wait", "done"]:
    """What a campaign worker does next to reach ``total`` COMPLETE + PRUNED trials.

    Trials running elsewhere are expected to count: wait for them rather than overshoot; if
    they fail (or their worker dies and they go stale) the budget reopens.
    """
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    if counted >= total:
        return "done"
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return "wait" if counted + running >= total else "run"


def _optimize(study: optuna.Study, runner: TrialRunner, n_trials: int | None) -> None:
    """Run trials until the campaign (``n_trials`` None) or this worker's share is done.

    Raises:
        ConvpipeError: after MAX_FAILED_IN_A_ROW failed trials in a row.
    """
    tune = runner.params.tune
    grace = STALE_BEATS * tune.heartbeat_seconds
    ran = failed = 0
    while True:
        fail_stale_trials(study, grace, runner.dead)
        if n_trials is not None:
            step = "run" if ran < n_trials else "done"
        else:
            step = _next_step(study, tune.n_trials)
        if step == "done":
            return
        if step == "wait":
            time.sleep(POLL_SECONDS)
            continue
        trial = run_trial(study, runner)
        ran += 1
        _report_trial(study, trial)
        failed = failed + 1 if trial.state == TrialState.FAIL else 0
        if failed >= MAX_FAILED_IN_A_ROW:
            raise ConvpipeError(
                f"{failed} trials failed in a row, the last: {trial.user_attrs.get(REASON_ATTR)}",
                f"in study '{study.study_name}'",
                "fix the setup or narrow tune.space",
            )


def _wait_for_dead_trials(study: optuna.Study, runner: TrialRunner) -> None:
    """Before leaving, let trials of dead workers run out their grace and mark them FAIL."""
    beat = runner.params.tune.heartbeat_seconds
    grace = STALE_BEATS * beat
    deadline = time.time() + grace + beat
    while time.time() < deadline:
        fail_stale_trials(study, grace, runner.dead)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not any(time.time() - last_beat(t) > LATE_BEATS * beat for t in running):
            return
        time.sleep(POLL_SECONDS)


def check_distributed_storage(params: Params) -> None:
    """Pruning under DDP needs an RDB storage (the integration's own requirement).

    Raises:
        ConvpipeError: if ``train.devices > 1`` with a journal storage.
    """
    devices = params.train.devices
    multi = (devices == "auto") or int(devices) > 1 or params.train.num_nodes > 1
    if multi and params.tune.storage.startswith("journal:"):
        raise ConvpipeError(
            "DDP trials (train.devices > 1) prune through the study storage, which must be an "
            f"RDB URL, got '{mask(params.tune.storage)}'",
            "in params.yaml tune.storage",
            "use sqlite:///optuna.db or postgresql://...",
        )


def preflight(params: Params) -> None:
    """Fail before the campaign starts on what would fail every trial: monitor, missing data.

    Raises:
        ConvpipeError: from the space, the monitor, the storage or the prepared data.
    """
    check_space(params)
    check_objectives(params)
    check_monitor(params.train)
    check_distributed_storage(params)
    build_datamodule(params)  # reads both manifests: says which `dvc repro` is missing


def tune_in_workers(
    params: Params, params_file: str, workers: int, n_trials: int | None, debug: bool
) -> optuna.Study:
    """Run the campaign in ``workers`` pinned worker processes (:mod:`convpipe.tuning.launch`).

    Args:
        params: validated params, read from ``params_file`` (which the workers read again).
        params_file: the params file's path.
        workers: how many worker processes.
        n_trials: as for :func:`tune`, shared out over the workers.
        debug: pass ``--debug`` on to the workers.

    Returns:
        The study, once every worker has exited.

    Raises:
        ConvpipeError: bad params, storages or data (said once, before any worker starts), or
            a worker that failed.
    """
    from convpipe.tuning.launch import launch_workers, plan_slots, visible_gpus

    preflight(params)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus = cpus or list(range(os.cpu_count() or 1))
    slots = plan_slots(workers, cpus, visible_gpus(params), n_trials)
    launch_workers(params, params_file, slots, debug)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_study(params)


def tune(params: Params, n_trials: int | None) -> optuna.Study:
    """Run (or continue) the campaign, then write reports and the MLflow summary.

    Args:
        params: validated params; ``tune`` configures the study.
        n_trials: run exactly this many more trials in this worker; None continues the study
            until it has ``tune.n_trials`` COMPLETE or PRUNED trials.

    Returns:
        The study.

    Raises:
        ConvpipeError: bad params, storages or data, or a campaign whose trials keep failing.
    """
    preflight(params)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(params)
    campaign = Campaign(params, study)
    if n_trials is None:
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        log.info("study %s: %d of %d trials done", study.study_name, done, params.tune.n_trials)
    runner = TrialRunner(params, campaign)
    try:
        _optimize(study, runner, n_trials)
        _wait_for_dead_trials(study, runner)
        report_dir = write_reports(study, params.paths.tuning_reports)
    except (KeyboardInterrupt, Preempted):
        campaign.close("KILLED")
        raise
    except BaseException:
        campaign.close("FAILED")
        raise
    campaign.finish(report_dir)
    return study

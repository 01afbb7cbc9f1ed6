"""Optuna tuning campaigns over params keys, on the validation split only.

A campaign is one Optuna study in ``tune.storage`` (sqlite, a journal file, or any RDB URL).
Each trial samples the keys of ``tune.space``, trains on the prepared + augmented data with a
pruning callback on ``train.monitor`` and returns the best validation value it reached; the
test split is never evaluated. Trials are driven with ``study.ask``/``study.tell`` by
:func:`tune`:

* ``tune.n_trials`` is the campaign total: a plain run continues the study until it holds that
  many COMPLETE + PRUNED trials (FAIL trials, diverged or killed, do not use the budget);
  ``n_trials=N`` runs exactly N more trials in this worker, whatever the study holds.
* Every running trial beats a heartbeat into its user attrs; a trial silent for three beats
  is marked FAIL (and its MLflow run closed) by the next worker that looks: at start, before
  each trial, and while it waits at its end.
* Trial *n* samples with a sampler seeded by ``base.seed + n``: a campaign is reproducible, a
  resumed one does not replay its points, and workers started at once never draw the same
  random start-up points.

MLflow gets one parent run per study (its id kept in the study's ``mlflow_run_id`` attribute,
so reruns and other workers nest under the same parent) and one child run per trial, tagged
with the trial's Optuna state.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import math
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from convpipe.config import (
    CategoricalDim,
    FloatDim,
    IntDim,
    Params,
    TuneParams,
    parse_params,
    set_dotted,
)
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path, write_text
from convpipe.tracking import (
    artifact_location,
    check_reachable,
    flatten,
    log_params,
    mark_model_training,
    mask_uri,
    mlflow_error,
    params_for_mlflow,
    run_tags,
    store_lock,
)
from convpipe.tracking import tracking_uri as resolve_uri
from convpipe.training import (
    INPUT_STAGES,
    EpochHistory,
    RunLogger,
    build_datamodule,
    build_model,
    build_trainer,
    check_monitor,
)

log = logging.getLogger("convpipe")

#: Trials that count toward ``tune.n_trials``: a failed trial (diverged, or its worker died)
#: is reported but does not use up the budget.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
#: The params a trial reads (the rest shape the prepared data, name paths or configure tuning).
TUNABLE = ("base.seed", "augment.online", "model.", "train.")
#: Keys a trial reads but must not vary.
FIXED = {
    "train.max_epochs": "tune.max_epochs sets the epochs of a trial",
    "train.monitor": "it is the objective",
    "train.monitor_mode": "it sets the study's direction",
}
SCHEMA_ATTEMPTS = 4
HEARTBEAT_ATTR = "convpipe_heartbeat"
RUN_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"
STUDY_KEY_TAG = "convpipe.study_key"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
#: A campaign stops (with an error) after this many failed trials in a row: the setup is broken.
MAX_FAILED_IN_A_ROW = 5
#: Seconds between looks at the study while waiting for other workers' trials.
POLL_SECONDS = 1.0
REPORTS = (
    "best_params.yaml",
    "trials.csv",
    "optimization_history.png",
    "intermediate_values.png",
    "parallel_coordinate.png",
    "param_importances.png",
)


# --------------------------------------------------------------------------- pure pieces


def _space_problem(key: str, dim: Any, leaves: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why ``key`` cannot be searched, and what to do, or None."""
    if key not in leaves:
        tunable = [k for k in leaves if k.startswith(TUNABLE) and k not in FIXED]
        close = difflib.get_close_matches(key, tunable, n=1)
        return "is not a params key", f"did you mean '{close[0]}'?" if close else "see params.yaml"
    if key in FIXED:
        return f"cannot be tuned ({FIXED[key]})", "remove it from tune.space"
    if not key.startswith(TUNABLE):
        return (
            "cannot be tuned: trials train on the prepared data and read only base.seed, "
            "augment.online, model.* and train.*",
            "remove it from tune.space",
        )
    current = leaves[key]
    if isinstance(dim, FloatDim) and isinstance(current, int) and not isinstance(current, bool):
        return "holds integers but is searched as type: float", "use type: int"
    return None


def _probes(dim: FloatDim | IntDim | CategoricalDim) -> list[Any]:
    """Values of ``dim`` that must all validate: its ends and middle, or every choice."""
    if isinstance(dim, CategoricalDim):
        return list(dim.choices)
    middle = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
    return [dim.low, dim.high, middle if isinstance(dim, FloatDim) else round(middle)]


def check_space(params: Params) -> None:
    """Refuse search-space keys a trial cannot vary, and ranges the schema would refuse.

    Raises:
        ConvpipeError: naming the key (and the closest valid one for a typo), or the schema's
            complaint about a value of the range.
    """
    leaves = dict(flatten(params.model_dump(mode="json")))
    for key, dim in params.tune.space.items():
        problem = _space_problem(key, dim, leaves)
        if problem is not None:
            raise ConvpipeError(
                f"tune.space key '{key}' {problem[0]}", "in params.yaml", problem[1]
            )
        for value in _probes(dim):
            with_values(params, {key: value}, f"tune.space ({key} = {value!r})")


def suggest(trial: Trial, key: str, dim: FloatDim | IntDim | CategoricalDim) -> Any:
    """Sample one value of ``key`` from its search dimension."""
    if isinstance(dim, FloatDim):
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    if isinstance(dim, IntDim):
        return trial.suggest_int(key, dim.low, dim.high, log=dim.log)
    return trial.suggest_categorical(key, dim.choices)


def with_values(params: Params, values: Mapping[str, Any], source: str = "tune.space") -> Params:
    """``params`` with dotted keys replaced by ``values``, validated by the schema again.

    Raises:
        ConvpipeError: if the result is not valid params (``source`` says where it came from).
    """
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value)
    return parse_params(raw, source)


def direction(params: Params) -> Literal["minimize", "maximize"]:
    """Optuna's direction for ``train.monitor_mode``."""
    return "minimize" if params.train.monitor_mode == "min" else "maximize"


def best_value(rows: list[dict[str, float]], monitor: str, mode: str) -> float:
    """The best ``monitor`` value over per-epoch history rows.

    Raises:
        ConvpipeError: if no epoch logged ``monitor``, or an epoch logged nan/inf.
    """
    found = [
        (int(row.get("epoch", i)), row[monitor]) for i, row in enumerate(rows) if monitor in row
    ]
    if not found:
        raise ConvpipeError(f"no epoch logged '{monitor}'", "in the trial", "check train.monitor")
    for epoch, value in found:
        if not math.isfinite(value):
            raise _diverged(monitor, value, epoch)
    scores = [value for _, value in found]
    return min(scores) if mode == "min" else max(scores)


def _diverged(monitor: str, value: float, epoch: int) -> ConvpipeError:
    return ConvpipeError(
        f"{monitor} became {value} at epoch {epoch}", "in the trial", "lower or narrow train.lr"
    )


def make_sampler(tune: TuneParams, seed: int) -> optuna.samplers.BaseSampler:
    """A seeded TPE or random sampler."""
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """The pruner of ``tune.pruner``; epochs are its steps."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, tune.warmup_epochs), max_resource=tune.max_epochs
        )
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------- storage


def _storage_file(url: str) -> Path | None:
    """The local file behind a journal or sqlite storage URL (None for servers and memory)."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        with contextlib.suppress(Exception):  # a malformed URL is reported by open_storage
            database = make_url(url).database
            if database and database != ":memory:":
                return Path(database)
    return None


def _scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url`` (driver messages may quote the URL)."""
    text = text.replace(url, mask_uri(url))
    with contextlib.suppress(ValueError):
        from urllib.parse import urlsplit

        password = urlsplit(url).password
        if password:
            text = text.replace(password, "***")
    return text


def open_storage(url: str) -> BaseStorage:
    """Optuna storage for ``tune.storage``: ``journal:<file>`` or any SQLAlchemy URL.

    The folder of a journal or sqlite file is created if needed; several workers on one
    sqlite file wait up to a minute for its lock instead of failing at once.

    Raises:
        ConvpipeError: for a URL that is neither, or a database that cannot be opened (the
            message never shows the URL's password).
    """
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = _storage_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConvpipeError(
            "tune.storage is not a storage URL",  # not echoed: it may hold a password
            "in params.yaml",
            "use sqlite:///optuna.db, journal:optuna.journal or postgresql://user@host/db",
        )
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}
    try:
        return _rdb_storage(url, engine)
    except Exception as exc:  # sqlalchemy raises many types for bad URLs and dead servers
        first = _scrub(" ".join(str(exc).split()), url)[:200]
        raise ConvpipeError(
            f"cannot open tune.storage ({type(exc).__name__}: {first})",
            f"at {mask_uri(url)}",
            "check the URL, its database driver, and that the server is running",
        ) from None


def _rdb_storage(url: str, engine: dict[str, Any]) -> BaseStorage:
    """RDBStorage, retried while another worker creates the schema of a fresh database."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # "already exists" / "duplicate key": the other worker won the creation race
            if attempt == SCHEMA_ATTEMPTS or (
                "exist" not in str(exc) and "duplicate" not in str(exc)
            ):
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")


def load_study(params: Params) -> optuna.Study:
    """Create or continue the study ``tune.study_name`` in ``tune.storage``.

    Raises:
        ConvpipeError: if the stored study optimises in the other direction.
    """
    tune = params.tune
    # Workers started together on a fresh sqlite file would each create Optuna's schema and
    # one would die ("UNIQUE constraint failed: alembic_version"): on one machine they take
    # turns (a server RDB copes through _rdb_storage's retries; a journal locks itself).
    with (
        store_lock(tune.storage) if tune.storage.startswith("sqlite") else contextlib.nullcontext()
    ):
        study = optuna.create_study(
            study_name=tune.study_name,
            storage=open_storage(tune.storage),
            sampler=make_sampler(tune, params.base.seed),
            pruner=make_pruner(tune),
            direction=direction(params),
            load_if_exists=True,
        )
    stored = [d.name.lower() for d in study.directions]
    if stored != [direction(params)]:
        raise ConvpipeError(
            f"study '{tune.study_name}' was created to {' and '.join(stored)}, but "
            f"train.monitor_mode '{params.train.monitor_mode}' asks to {direction(params)}",
            f"in {mask_uri(tune.storage)}",
            "use a new tune.study_name",
        )
    return study


# --------------------------------------------------------------------------- liveness


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial_id: int, seconds: float) -> Iterator[None]:
    """Beat ``time.time()`` into the trial's user attrs now and every ``seconds`` until exit."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(seconds):
            with contextlib.suppress(Exception):  # a missed beat only delays stale detection
                study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())

    study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
    thread = threading.Thread(target=beat, name="convpipe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _last_beat(trial: FrozenTrial) -> float:
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
        silent = now - _last_beat(trial)
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


# --------------------------------------------------------------------------- MLflow nesting


def study_key(params: Params, study: optuna.Study) -> str:
    """An id of this study in this storage, tagged on its parent run (file storages are local)."""
    storage = params.tune.storage
    where = mask_uri(storage)
    path = _storage_file(storage)
    if path is not None:
        where = f"{socket.gethostname()}:{path.resolve()}"
    text = f"{where}\n{study.study_name}\n{study._study_id}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class Campaign:
    """The MLflow side of a study: one parent run, one nested child run per trial."""

    def __init__(self, params: Params, study: optuna.Study) -> None:
        from mlflow.tracking import MlflowClient

        self.params = params
        self.study = study
        self.uri = resolve_uri(params.mlflow)
        self.key = study_key(params, study)
        check_reachable(self.uri)
        try:
            with store_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment()
                mark_model_training(self.client, self.experiment_id)
                self.parent_id = self._parent()
        except ConvpipeError:
            raise
        except Exception as exc:
            raise mlflow_error(exc, self.uri, "opening the tuning run") from None

    def _experiment(self) -> str:
        name = self.params.mlflow.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location(self.uri)
                )
            except Exception:  # created by a worker on another machine meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        return str(found.experiment_id)

    def _alive(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted for good, or a run of another tracking store
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def _find_parent(self) -> str | None:
        """The earliest parent run tagged with this study's key (workers on other machines)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{STUDY_KEY_TAG}` = '{self.key}'"
        )
        if not runs:
            return None
        return str(min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id)

    def _parent(self) -> str:
        run_id = self.study.user_attrs.get(RUN_ATTR)
        if not (run_id and self._alive(str(run_id))):
            run_id = self._find_parent() or self._new_parent()
            self.study.set_user_attr(RUN_ATTR, run_id)
        self.client.update_run(str(run_id), status="RUNNING")
        return str(run_id)

    def _new_parent(self) -> str:
        tune = self.params.tune
        tags = {
            **run_tags(INPUT_STAGES),
            "convpipe.kind": "tuning",
            "optuna.study_name": tune.study_name,
            STUDY_KEY_TAG: self.key,
        }
        run_id = self.client.create_run(
            self.experiment_id, run_name=f"tune-{tune.study_name}", tags=tags
        ).info.run_id
        winner = self._find_parent() or run_id
        if winner != run_id:  # a worker elsewhere opened the campaign at the same moment
            self.client.delete_run(run_id)
            return winner
        space = {k: v.model_dump(mode="json") for k, v in tune.space.items()}
        values = {
            **params_for_mlflow(self.params),
            "tune.storage": mask_uri(tune.storage),
            "study_name": tune.study_name,
            "storage": mask_uri(tune.storage),
            "direction": direction(self.params),
            "monitor": self.params.train.monitor,
            "search_space": json.dumps(space),
        }
        log_params(self.client, run_id, values)
        return run_id

    def start_trial(self, trial: Trial, values: Mapping[str, Any]) -> str:
        """Open the child run of ``trial`` with its sampled values as params."""
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "convpipe.kind": "trial",
            "optuna.trial_number": str(trial.number),
        }
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number}", tags=tags
        )
        log_params(self.client, run.info.run_id, {k: str(v) for k, v in values.items()})
        trial.set_user_attr(RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def end_trial(
        self, run_id: str, state: str, reason: str | None = None, status: str | None = None
    ) -> None:
        """Record the trial's final Optuna ``state`` on its child run (``status`` overrides)."""
        self.client.set_tag(run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(run_id, "optuna.fail_reason", reason[:5000])
        self.client.set_terminated(run_id, status or MLFLOW_STATUS[state])

    def _child_runs(self, trial: FrozenTrial) -> list[str]:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            return [str(run_id)]
        # killed between opening the run and recording its id on the trial
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' "
            f"and tags.`optuna.trial_number` = '{trial.number}'",
        )
        return [r.info.run_id for r in runs]

    def end_stale(self, trial: FrozenTrial) -> None:
        """Close the child run of a trial that was marked FAIL (its worker died)."""
        reason = trial.user_attrs.get(REASON_ATTR, "worker stopped (no heartbeat)")
        try:
            for run_id in self._child_runs(trial):
                self.end_trial(run_id, "FAIL", str(reason))
        except Exception as exc:  # tracking trouble must not stop the campaign
            log.warning("could not close the MLflow run of trial %d: %s", trial.number, exc)

    def finish(self, report_dir: Path) -> None:
        """Summarise the study on the parent run, attach the reports, mark it FINISHED."""
        counted = self.study.get_trials(deepcopy=False, states=COUNTED)
        self.client.log_metric(self.parent_id, "trials_finished", float(len(counted)))
        if any(t.state == TrialState.COMPLETE for t in counted):
            best = self.study.best_trial
            self.client.log_metric(self.parent_id, "best_value", float(best.value or 0.0))
            self.client.set_tag(self.parent_id, "best_trial", str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.parent_id, f"best.{key}", str(value))
        for path in sorted(report_dir.glob("*")):
            if path.name in REPORTS:
                self.client.log_artifact(self.parent_id, str(path), "tuning")
        self.client.set_terminated(self.parent_id, "FINISHED")

    def close(self, status: str) -> None:
        """Mark the parent run ``status`` after an error or interrupt (never raises)."""
        try:
            self.client.set_terminated(self.parent_id, status)
        except Exception as exc:  # already failing: the first error is the one to report
            log.warning("could not mark MLflow run %s %s: %s", self.parent_id, status, exc)


# --------------------------------------------------------------------------- one trial


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


class FinitePruning(PyTorchLightningPruningCallback):
    """Optuna's pruning callback, but a nan/inf monitor fails the trial instead of pruning it."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop with an error on a non-finite monitor, else report it to the pruner."""
        score = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and score is not None and not math.isfinite(float(score)):
            raise _diverged(self.monitor, float(score), pl_module.current_epoch)
        super().on_validation_end(trainer, pl_module)


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ConvpipeError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:2000]


@dataclass
class TrialRunner:
    """The objective: sample, train on train/val, return the best monitored value.

    Each trial's MLflow child run ends with the outcome: COMPLETE, PRUNED, or FAIL with the
    reason (KILLED on an interrupt).
    """

    params: Params
    campaign: Campaign

    def __call__(self, trial: Trial) -> float:
        """Run one trial (a heartbeat covers all of it).

        Raises:
            optuna.TrialPruned: the pruner stopped it.
            Exception: whatever failed it (a ConvpipeError for divergence).
        """
        tune, campaign = self.params.tune, self.campaign
        with heartbeat(campaign.study, trial._trial_id, tune.heartbeat_seconds):
            values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
            run_id = campaign.start_trial(trial, values)
            try:
                value = self.fit(trial, values, run_id)
            except optuna.TrialPruned:
                campaign.end_trial(run_id, "PRUNED")
                raise
            except (KeyboardInterrupt, SystemExit):
                campaign.end_trial(run_id, "FAIL", "interrupted", status="KILLED")
                raise
            except Exception as exc:
                campaign.end_trial(run_id, "FAIL", _reason(exc))
                raise
            campaign.client.log_metric(run_id, "objective", value)
            campaign.end_trial(run_id, "COMPLETE")
        return value

    def fit(self, trial: Trial, values: Mapping[str, Any], run_id: str) -> float:
        """Train with the sampled ``values``; prune (or fail on nan) on ``train.monitor``."""
        fixed = {"train.max_epochs": self.params.tune.max_epochs, **trial_strategy(self.params)}
        params = with_values(self.params, {**values, **fixed})
        cfg = params.train
        L.seed_everything(params.base.seed, workers=True, verbose=False)
        datamodule, model = build_model(params)
        history = EpochHistory()
        pruning = FinitePruning(trial, monitor=cfg.monitor)
        early = EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.patience)
        callbacks: list[Callback] = [pruning, early, history, SameValuesOnEveryRank(trial)]
        logger = RunLogger(tracking_uri=self.campaign.uri, run_id=run_id)
        with quiet_lightning(), tempfile.TemporaryDirectory(prefix="convpipe-trial-") as root:
            trainer = build_trainer(cfg, callbacks, logger, root, interactive=False)
            trainer.fit(model, datamodule=datamodule)
        pruning.check_pruned()  # under DDP the prune decision arrives here, not as an exception
        if history.rows:
            return best_value(history.rows, cfg.monitor, cfg.monitor_mode)
        # spawned DDP ranks kept their history; the pruning callback stored every epoch's value
        reported = trial.study._storage.get_trial(trial._trial_id).intermediate_values
        rows = [{cfg.monitor: value} for value in reported.values()]
        return best_value(rows, cfg.monitor, cfg.monitor_mode)


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


def run_trial(study: optuna.Study, runner: TrialRunner) -> FrozenTrial:
    """Ask for a trial, run it, tell its outcome; returns it as stored.

    Raises:
        KeyboardInterrupt: after recording the trial FAIL (also for Lightning's exit on Ctrl+C).
    """
    trial = study.ask()
    study.sampler = make_sampler(runner.params.tune, runner.params.base.seed + trial.number)
    value: float | None = None
    try:
        value = runner(trial)
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except (KeyboardInterrupt, SystemExit) as exc:
        with contextlib.suppress(Exception):
            trial.set_user_attr(REASON_ATTR, "interrupted")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise KeyboardInterrupt from exc
    except Exception as exc:
        log.debug("trial %d failed", trial.number, exc_info=True)
        with contextlib.suppress(Exception):  # failed by a worker that took this one for dead
            trial.set_user_attr(REASON_ATTR, _reason(exc))
        state = TrialState.FAIL
    frozen = study.tell(trial, value, state=state, skip_if_finished=True)
    if frozen.state != state:  # another worker marked it FAIL meanwhile: MLflow must agree
        runner.campaign.end_stale(frozen)
    return frozen


# --------------------------------------------------------------------------- reports


def write_reports(study: optuna.Study, out_dir: str | Path) -> Path:
    """Best params (YAML), every trial (CSV) and the standard Optuna plots (PNG).

    Each file is replaced atomically (workers may finish at the same time); a report that
    cannot be made yet (no complete trial, importances of fewer than two) is removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "trials.csv", study.trials_dataframe().to_csv(index=False))
    written = {"trials.csv"}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        _write_best(study, out / "best_params.yaml")
        written.add("best_params.yaml")
    written |= _write_plots(study, out, len(complete))
    for name in set(REPORTS) - written:
        (out / name).unlink(missing_ok=True)
    return out


def _write_best(study: optuna.Study, path: Path) -> None:
    from ruamel.yaml import YAML

    best = study.best_trial
    doc = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "trial": best.number,
        "value": best.value,
        "params": dict(best.params),
    }
    buf = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, buf)
    write_text(path, buf.getvalue())


def _write_plots(study: optuna.Study, out: Path, complete: int) -> set[str]:
    import matplotlib

    matplotlib.use("Agg")  # optuna's matplotlib plots go through pyplot; never open a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {
        "optimization_history.png": vis.plot_optimization_history,
        "intermediate_values.png": vis.plot_intermediate_values,
        "parallel_coordinate.png": vis.plot_parallel_coordinate,
        "param_importances.png": vis.plot_param_importances,
    }
    if complete < 2:
        del plots["param_importances.png"]
    written = set()
    for name, plot in plots.items():
        try:
            with _no_warnings():
                axes = plot(study)
            figure = (axes.ravel()[0] if hasattr(axes, "ravel") else axes).get_figure(root=True)
            if figure is None:
                continue
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            with atomic_path(out / name) as tmp:
                figure.savefig(tmp, format="png", dpi=90)
        except Exception as exc:  # a report must not fail the campaign (e.g. constant params)
            log.warning("skipped %s: %s", name, exc)
            continue
        written.add(name)
    plt.close("all")  # also the figures of plots that failed half-way
    return written


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Optuna's plots warn about experimental APIs and empty studies: not the user's concern."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- campaign


def _report_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """One progress line per finished trial."""
    took = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else 0.0
    )
    value = f"{trial.value:.5f}" if trial.value is not None else "-"
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
    grace = 3 * tune.heartbeat_seconds
    ran = failed = 0
    while True:
        fail_stale_trials(study, grace, runner.campaign.end_stale)
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


def _wait_for_dead_trials(study: optuna.Study, campaign: Campaign) -> None:
    """Before leaving, let trials of dead workers run out their grace and mark them FAIL."""
    beat = campaign.params.tune.heartbeat_seconds
    grace = 3 * beat
    deadline = time.time() + grace + beat
    while time.time() < deadline:
        fail_stale_trials(study, grace, campaign.end_stale)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not any(time.time() - _last_beat(t) > 2 * beat for t in running):
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
            f"RDB URL, got '{mask_uri(params.tune.storage)}'",
            "in params.yaml tune.storage",
            "use sqlite:///optuna.db or postgresql://...",
        )


def preflight(params: Params) -> None:
    """Fail before the campaign starts on what would fail every trial: monitor, missing data.

    Raises:
        ConvpipeError: from the space, the monitor, the storage or the prepared data.
    """
    check_space(params)
    check_monitor(params.train)
    check_distributed_storage(params)
    build_datamodule(params)  # reads both manifests: says which `dvc repro` is missing


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
    try:
        _optimize(study, TrialRunner(params, campaign), n_trials)
        _wait_for_dead_trials(study, campaign)
        report_dir = write_reports(study, params.paths.tuning_reports)
    except KeyboardInterrupt:
        campaign.close("KILLED")
        raise
    except BaseException:
        campaign.close("FAILED")
        raise
    campaign.finish(report_dir)
    return study


# --------------------------------------------------------------------------- --apply


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NOT_PLAIN = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def yaml_scalar(value: Any) -> str:
    """``value`` as a YAML scalar that reads back the same in YAML 1.1 and 1.2."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _NOT_PLAIN:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _scalar_span(root: Any, key: str, path: Path) -> tuple[int, int]:
    """Start and end offsets of the scalar value of dotted ``key`` in a composed YAML doc."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode

    node = root
    for part in key.split("."):
        found = None
        if isinstance(node, MappingNode):
            found = next((v for k, v in node.value if k.value == part), None)
        if found is None:
            raise ConvpipeError(f"key '{key}' not found", f"in {path}", "add it to the file")
        node = found
    if not isinstance(node, ScalarNode):
        raise ConvpipeError(f"'{key}' is not a single value", f"in {path}", "edit it by hand")
    return node.start_mark.index, node.end_mark.index


def _replace(text: str, start: int, end: int, new: str) -> str:
    """``text[start:end]`` replaced by ``new``, keeping the column of a trailing comment."""
    rest = text[end:]
    gap = len(rest) - len(rest.lstrip(" "))
    if gap and rest[gap:].startswith("#"):
        rest = " " * max(1, gap + (end - start) - len(new)) + rest[gap:]
    return text[:start] + new + rest


def apply_best(study: optuna.Study, params_file: str | Path) -> dict[str, Any]:
    """Write the best trial's values into ``params_file``, changing nothing else in it.

    Only the characters of each tuned value are replaced: comments, order, quoting and
    layout stay as they were. The result is validated before it is written.

    Returns:
        The values written (floats rounded to 6 significant digits).

    Raises:
        ConvpipeError: if the study has no complete trial yet, or the result is not valid.
    """
    from ruamel.yaml import YAML

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConvpipeError(
            f"study '{study.study_name}' has no complete trial", "", "run convpipe tune first"
        )
    values = {
        k: float(f"{v:.6g}") if isinstance(v, float) else v
        for k, v in study.best_trial.params.items()
    }
    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    root = YAML().compose(text)
    spans = sorted(((*_scalar_span(root, k, path), k) for k in values), reverse=True)
    for start, end, key in spans:  # from the end, so earlier offsets stay valid
        text = _replace(text, start, end, yaml_scalar(values[key]))
    parse_params(YAML(typ="safe", pure=True).load(text), str(path))
    write_text(path, text)
    return values

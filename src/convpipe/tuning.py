"""Optuna tuning campaigns over any params keys, on the validation split only.

A campaign is one Optuna study in ``tune.storage`` (sqlite, a journal file, or any RDB URL).
Each trial samples the keys of ``tune.space``, trains on the prepared + augmented data with a
pruning callback on ``train.monitor``, and returns the best validation value it reached. The
study tolerates killed workers: every running trial beats a heartbeat into the storage, and a
trial whose heartbeat stops is marked FAIL by the next worker that looks.

MLflow gets one parent run per study (found again through the study's ``mlflow_run_id``
attribute, so reruns and other workers nest under the same parent) and one child run per trial.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import optuna
from lightning.pytorch.callbacks import EarlyStopping
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from convpipe.config import (
    CategoricalDim,
    FloatDim,
    IntDim,
    Params,
    TuneParams,
    parse_params,
)
from convpipe.errors import ConvpipeError
from convpipe.tracking import flatten, log_params, mask_uri, mlflow_error
from convpipe.tracking import tracking_uri as resolve_uri
from convpipe.training import EpochHistory, RunLogger, build_model, build_trainer

log = logging.getLogger("convpipe")

#: Trials that count toward ``tune.n_trials``: a failed trial (diverged, or its worker died)
#: is reported but does not use up the budget.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Sections a search space may not touch: they say where things are, not how to train.
FROZEN_SECTIONS = ("paths", "mlflow", "tune")
HEARTBEAT_ATTR = "convpipe_heartbeat"
RUN_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


# --------------------------------------------------------------------------- pure pieces


def check_space(params: Params) -> None:
    """Refuse search-space keys that are not params leaves, or that must not be tuned.

    Raises:
        ConvpipeError: naming the key and the closest valid one.
    """
    leaves = dict(flatten(params.model_dump(mode="json")))
    tunable = [k for k in leaves if k.split(".")[0] not in FROZEN_SECTIONS]
    for key in params.tune.space:
        if key in tunable:
            continue
        close = difflib.get_close_matches(key, tunable, n=1)
        reason = "cannot be tuned" if key in leaves else "is not a params key"
        raise ConvpipeError(
            f"tune.space key '{key}' {reason}",
            "in params.yaml",
            f"did you mean '{close[0]}'?" if close else "use keys like 'train.lr'",
        )


def suggest(trial: Trial, key: str, dim: FloatDim | IntDim | CategoricalDim) -> Any:
    """Sample one value of ``key`` from its search dimension."""
    if isinstance(dim, FloatDim):
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    if isinstance(dim, IntDim):
        return trial.suggest_int(key, dim.low, dim.high, log=dim.log)
    return trial.suggest_categorical(key, dim.choices)


def with_values(params: Params, values: Mapping[str, Any], source: str = "tune.space") -> Params:
    """``params`` with dotted keys replaced by ``values``, validated by the schema again."""
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return parse_params(raw, source)


def direction(params: Params) -> Literal["minimize", "maximize"]:
    """Optuna's direction for ``train.monitor_mode``."""
    return "minimize" if params.train.monitor_mode == "min" else "maximize"


def best_value(rows: list[dict[str, float]], monitor: str, mode: str) -> float:
    """The best ``monitor`` value over per-epoch history rows.

    Raises:
        ConvpipeError: if no epoch logged ``monitor``.
    """
    values = [row[monitor] for row in rows if monitor in row]
    if not values:
        raise ConvpipeError(f"no epoch logged '{monitor}'", "in the trial", "check train.monitor")
    return min(values) if mode == "min" else max(values)


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


def open_storage(url: str) -> BaseStorage | str:
    """Optuna storage for ``tune.storage``: ``journal:<file>`` or any SQLAlchemy URL.

    Raises:
        ConvpipeError: for a URL that is neither.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConvpipeError(
            f"tune.storage '{mask_uri(url)}' is not a storage URL",
            "in params.yaml",
            "use sqlite:///optuna.db, journal:optuna.journal or postgresql://user@host/db",
        )
    # Several workers write one sqlite file: wait for its lock instead of failing at once.
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # sqlalchemy raises many types for bad URLs and dead servers
        raise ConvpipeError(
            f"cannot open tune.storage ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            f"at {mask_uri(url)}",
            "check the URL and that the database server is running",
        ) from None


def load_study(params: Params) -> optuna.Study:
    """Create or continue the study ``tune.study_name`` in ``tune.storage``.

    The sampler is seeded with ``base.seed`` plus the number of trials already in the
    study, so a fresh single-worker campaign is reproducible and a rerun does not replay the
    points it already tried.

    Raises:
        ConvpipeError: if the stored study optimises in the other direction.
    """
    tune = params.tune
    storage = open_storage(tune.storage)
    existing = optuna.create_study(
        study_name=tune.study_name,
        storage=storage,
        direction=direction(params),
        load_if_exists=True,
    )
    if existing.direction.name.lower() != direction(params):
        raise ConvpipeError(
            f"study '{tune.study_name}' was created to {existing.direction.name.lower()}, but "
            f"train.monitor_mode now asks to {direction(params)}",
            f"in {mask_uri(tune.storage)}",
            "use a new tune.study_name",
        )
    seed = params.base.seed + len(existing.get_trials(deepcopy=False))
    return optuna.load_study(
        study_name=tune.study_name,
        storage=storage,
        sampler=make_sampler(tune, seed),
        pruner=make_pruner(tune),
    )


# --------------------------------------------------------------------------- liveness


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial_id: int, seconds: int) -> Iterator[None]:
    """Beat ``time.time()`` into the trial's user attrs every ``seconds`` while it runs."""
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
    """Mark FAIL every RUNNING trial whose heartbeat is older than ``grace`` seconds."""
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        silent = now - _last_beat(trial)
        if silent <= grace:
            continue
        storage = study._storage
        try:
            reason = f"worker stopped: no heartbeat for {silent:.0f}s"
            storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # another worker failed it first
            continue
        failed.append(trial.number)
        on_fail(trial)
        log.warning("trial %d marked FAIL: %s", trial.number, reason)
    return failed


# --------------------------------------------------------------------------- MLflow nesting


class Campaign:
    """The MLflow side of a study: one parent run, one nested child run per trial."""

    def __init__(self, params: Params, study: optuna.Study) -> None:
        from mlflow.tracking import MlflowClient

        self.params = params
        self.study = study
        self.uri = resolve_uri(params.mlflow)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment()
            self.parent_id = self._parent()
        except Exception as exc:
            if isinstance(exc, ConvpipeError):
                raise
            raise mlflow_error(exc, self.uri, "opening the tuning run") from None

    def _experiment(self) -> str:
        name = self.params.mlflow.experiment
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _parent(self) -> str:
        existing = self.study.user_attrs.get(RUN_ATTR)
        if existing:
            self.client.update_run(existing, status="RUNNING")
            return str(existing)
        tune = self.params.tune
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune-{tune.study_name}",
            tags={"convpipe.kind": "tuning", "optuna.study_name": tune.study_name},
        )
        space = {k: v.model_dump(mode="json") for k, v in tune.space.items()}
        values = {
            "study_name": tune.study_name,
            "storage": mask_uri(tune.storage),
            "direction": direction(self.params),
            "monitor": self.params.train.monitor,
            "sampler": tune.sampler,
            "pruner": tune.pruner,
            "n_trials": str(tune.n_trials),
            "max_epochs": str(tune.max_epochs),
            "search_space": json.dumps(space),
        }
        log_params(self.client, run.info.run_id, values)
        self.study.set_user_attr(RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def start_trial(self, trial: Trial, values: Mapping[str, Any]) -> str:
        """Open the child run of ``trial`` with its sampled values as params."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number}",
            tags={"mlflow.parentRunId": self.parent_id, "optuna.trial_number": str(trial.number)},
        )
        log_params(self.client, run.info.run_id, {k: str(v) for k, v in values.items()})
        trial.set_user_attr(RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def end_trial(self, run_id: str, state: str, reason: str | None = None) -> None:
        """Record the trial's final Optuna state on its child run."""
        self.client.set_tag(run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(run_id, "optuna.fail_reason", reason[:5000])
        self.client.set_terminated(run_id, MLFLOW_STATUS[state])

    def end_stale(self, trial: FrozenTrial) -> None:
        """Close the child run of a trial whose worker died."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            with contextlib.suppress(Exception):
                self.end_trial(str(run_id), "FAIL", "worker stopped (no heartbeat)")

    def finish(self, report_dir: Path) -> None:
        """Summarise the study on the parent run and attach the reports."""
        counted = self.study.get_trials(deepcopy=False, states=COUNTED)
        self.client.log_metric(self.parent_id, "trials_finished", float(len(counted)))
        if any(t.state == TrialState.COMPLETE for t in counted):
            best = self.study.best_trial
            self.client.log_metric(self.parent_id, "best_value", float(best.value or 0.0))
            self.client.set_tag(self.parent_id, "best_trial", str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.parent_id, f"best.{key}", str(value))
        for path in sorted(report_dir.glob("*")):
            self.client.log_artifact(self.parent_id, str(path), "tuning")
        self.client.set_terminated(self.parent_id, "FINISHED")


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


@dataclass
class TrialRunner:
    """The objective: sample, train on train/val, return the best monitored value."""

    params: Params
    campaign: Campaign

    def __call__(self, trial: Trial) -> float:
        """Run one trial; pruned and failed trials are recorded on their MLflow run."""
        tune = self.params.tune
        values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
        run_id = self.campaign.start_trial(trial, values)
        try:
            with heartbeat(self.campaign.study, trial._trial_id, tune.heartbeat_seconds):
                value = self.fit(trial, values, run_id)
        except optuna.TrialPruned:
            self.campaign.end_trial(run_id, "PRUNED")
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConvpipeError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(REASON_ATTR, " ".join(reason.split())[:2000])
            self.campaign.end_trial(run_id, "FAIL", reason)
            raise
        self.campaign.client.log_metric(run_id, "objective", value)
        self.campaign.end_trial(run_id, "COMPLETE")
        return value

    def fit(self, trial: Trial, values: Mapping[str, Any], run_id: str) -> float:
        """Train with the sampled ``values``; prune on ``train.monitor`` per epoch."""
        from optuna_integration import PyTorchLightningPruningCallback

        params = with_values(
            self.params, {**values, "train.max_epochs": self.params.tune.max_epochs}
        )
        cfg = params.train
        L.seed_everything(params.base.seed, workers=True, verbose=False)
        datamodule, model = build_model(params)
        history = EpochHistory()
        pruning = PyTorchLightningPruningCallback(trial, monitor=cfg.monitor)
        early = EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.patience)
        logger = RunLogger(tracking_uri=self.campaign.uri, run_id=run_id)
        with quiet_lightning(), tempfile.TemporaryDirectory(prefix="convpipe-trial-") as root:
            trainer = build_trainer(cfg, [pruning, early, history], logger, root, interactive=False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                trainer.fit(model, datamodule=datamodule)
        pruning.check_pruned()  # under DDP the prune decision arrives here, not as an exception
        value = best_value(history.rows, cfg.monitor, cfg.monitor_mode)
        if value != value or abs(value) == float("inf"):
            raise ConvpipeError(f"{cfg.monitor} is {value}", "in the trial", "lower train.lr")
        return value


# --------------------------------------------------------------------------- reports


def write_reports(study: optuna.Study, out_dir: str | Path) -> Path:
    """Best params (YAML), every trial (CSV) and the standard Optuna plots (PNG)."""
    from convpipe.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            _write_best(study, tmp / "best_params.yaml")
        _write_plots(study, tmp, len(complete))
    return Path(out_dir)


def _write_best(study: optuna.Study, path: Path) -> None:
    from ruamel.yaml import YAML

    best = study.best_trial
    doc = {"trial": best.number, "value": best.value, "params": dict(best.params)}
    with open(path, "w", encoding="utf-8") as fh:
        YAML().dump(doc, fh)


def _write_plots(study: optuna.Study, out: Path, complete: int) -> None:
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
    for name, plot in plots.items():
        if name == "param_importances.png" and complete < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of constant values
                log.warning("skipped %s: %s", name, exc)
                continue
        figure = (axes.ravel()[0] if hasattr(axes, "ravel") else axes).get_figure(root=True)
        if figure is None:
            continue
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        figure.savefig(out / name, dpi=90)
        plt.close(figure)


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
        time.sleep(1.0)


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


def tune(params: Params, n_trials: int | None) -> optuna.Study:
    """Run (or continue) the campaign, then write reports and the MLflow summary.

    Args:
        params: validated params; ``tune`` configures the study.
        n_trials: run exactly this many more trials in this worker; None continues the study
            until it has ``tune.n_trials`` COMPLETE or PRUNED trials.

    Returns:
        The study.
    """
    check_space(params)
    check_distributed_storage(params)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(params)
    campaign = Campaign(params, study)
    grace = 3 * params.tune.heartbeat_seconds
    fail_stale_trials(study, grace, campaign.end_stale)

    def before_each(study: optuna.Study, trial: FrozenTrial) -> None:
        _report_trial(study, trial)
        fail_stale_trials(study, grace, campaign.end_stale)

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [before_each]
    if n_trials is None:
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        n_trials = max(0, params.tune.n_trials - done)
        callbacks.append(optuna.study.MaxTrialsCallback(params.tune.n_trials, states=COUNTED))
        log.info(
            "study %s: %d of %d trials done, %d to run",
            study.study_name,
            done,
            params.tune.n_trials,
            n_trials,
        )
    if n_trials:
        study.optimize(
            TrialRunner(params, campaign),
            n_trials=n_trials,
            callbacks=callbacks,
            catch=(Exception,),  # a failed trial is recorded FAIL and the campaign goes on
        )
    _wait_for_dead_trials(study, campaign)
    report_dir = write_reports(study, params.paths.tuning_reports)
    campaign.finish(report_dir)
    return study


# --------------------------------------------------------------------------- --apply


def apply_best(study: optuna.Study, params_file: str | Path) -> dict[str, Any]:
    """Write the best trial's values into ``params_file``, keeping its comments and order.

    Returns:
        The values written (rounded to 6 significant digits).

    Raises:
        ConvpipeError: if the study has no complete trial yet.
    """
    from ruamel.yaml import YAML

    from convpipe.io import atomic_path

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConvpipeError(
            f"study '{study.study_name}' has no complete trial", "", "run convpipe tune first"
        )
    values = {
        k: float(f"{v:.6g}") if isinstance(v, float) else v
        for k, v in study.best_trial.params.items()
    }
    yaml = YAML()
    yaml.preserve_quotes = True
    path = Path(params_file)
    doc = yaml.load(path)
    for key, value in values.items():
        node = doc
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yaml.dump(doc, fh)
    return values

"""The MLflow run of a training: opened by train, closed whatever happens, extended by evaluate.

Train opens it with its params and tags (:func:`start_run`) and marks it FAILED or KILLED on
any error (:func:`failed_run_on_error`); evaluate finds it again (:func:`open_training_run`)
and adds the test metrics and pictures (:func:`log_evaluation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from convpipe.config.schema import Params
from convpipe.data.datamodule import ConvDataModule
from convpipe.data.manifest import MANIFEST, PIPELINE_FILE
from convpipe.errors import ConvpipeError, Preempted
from convpipe.redact import mask
from convpipe.tracking.provenance import (
    RunInfo,
    dataset_inputs,
    run_name,
    run_tags,
    training_note,
)
from convpipe.tracking.store import (
    TrackingLost,
    artifact_location,
    check_reachable,
    is_tracking_failure,
    mark_model_training,
    mlflow_error,
    store_lock,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

log = logging.getLogger("convpipe")

# The DVC stages whose outputs training reads (their dvc.lock hashes become run tags).
INPUT_STAGES = ("prepare", "augment")

# Set on the MLflow run a preemption stopped: what stopped it and where its state is.
INTERRUPTED_TAG = "convpipe.last_interruption"

# Sources that need no data.path: where their images come from, for MLflow's dataset source.
BUILTIN_SOURCES = {"digits": "sklearn.datasets.load_digits"}


class RunLogger(MLFlowLogger):
    """MLFlowLogger that leaves params to the train stage.

    Lightning would log the LightningModule's ``hparams`` a second time under other names
    (``train/lr`` beside ``train.lr``) and truncate every value to 250 characters; the run's
    params are logged once, in full, by :func:`convpipe.tracking.params.log_params` instead.
    """

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Ignore Lightning's hparams (see the class docstring)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log with the epoch as MLflow's step, so charts plot ``val/acc`` per epoch.

        Every metric convpipe logs is epoch-level; Lightning would step them by optimiser
        steps, whose count per epoch changes with the batch size and so misaligns runs.
        """
        epoch = metrics.get("epoch")
        super().log_metrics(metrics, int(epoch) if epoch is not None else step)


def _terminate(logger: MLFlowLogger | DummyLogger, status: str) -> None:
    """Set the run's final status; a tracking failure here must not hide the original error."""
    try:
        logger.experiment.set_terminated(str(logger.run_id), status)
    except Exception as exc:  # already failing: the first error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, exc)


def _tag(logger: MLFlowLogger | DummyLogger, key: str, value: str) -> None:
    """Tag the run; like :func:`_terminate`, never hiding the error being reported."""
    try:
        logger.experiment.set_tag(str(logger.run_id), key, mask(value))
    except Exception as exc:
        log.warning("could not tag MLflow run %s: %s", logger.run_id, exc)


@contextmanager
def tracking_lost_is_resumable(uri: str, checkpoints: str) -> Iterator[None]:
    """Turn a tracking store that died mid-training into one line saying how to resume.

    The last finished epoch is in ``checkpoints`` and the resume record is kept, so the rerun
    continues into the same MLflow run once the store answers again.
    """
    try:
        yield
    except TrackingLost:
        raise
    except Exception as exc:
        if not is_tracking_failure(exc):
            raise
        first = mask(" ".join(str(getattr(exc, "message", exc)).split()))[:200]
        raise TrackingLost(
            f"MLflow stopped answering during training ({type(exc).__name__}: {first})",
            f"at {mask(uri)}; the last finished epoch is saved in {checkpoints}",
            "bring the tracking server back and rerun: the training resumes from that epoch",
        ) from None


@contextmanager
def failed_run_on_error(logger: MLFlowLogger | DummyLogger) -> Iterator[None]:
    """Mark the MLflow run FAILED (KILLED on an interrupt) if anything below raises.

    The run must already exist (see :func:`start_run`), so no run stays RUNNING. Lightning
    answers Ctrl+C inside ``fit``/``test`` with ``sys.exit(1)`` after its own cleanup; that
    exit is re-raised as the KeyboardInterrupt it was, so the stage reports it in one line.
    """
    try:
        yield
    except Preempted as exc:
        _terminate(logger, "KILLED")
        _tag(logger, INTERRUPTED_TAG, exc.description)
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        _terminate(logger, "KILLED")
        if isinstance(exc, SystemExit):
            raise KeyboardInterrupt from exc
        raise
    except BaseException as exc:
        if not is_tracking_failure(exc):  # else the store is gone: nothing to mark it in
            _terminate(logger, "FAILED")
        raise


def start_run(params: Params, uri: str, run_id: str | None = None) -> RunLogger | DummyLogger:
    """Open the MLflow run (creating the experiment if needed) and return its logger.

    Under DDP only rank 0 opens the run: the other ranks get a logger that does nothing
    (Lightning logs from rank 0 anyway), so they never touch the store — several processes
    creating one fresh sqlite database at once would race.

    Raises:
        ConvpipeError: If the tracking store is unreachable or refuses the run.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return DummyLogger()
    from mlflow.exceptions import MlflowException

    check_reachable(uri)
    tags = run_tags(INPUT_STAGES)
    tags["mlflow.note.content"] = training_note(tags)
    try:
        with store_lock(uri):
            logger = RunLogger(
                experiment_name=params.mlflow.experiment,
                run_name=run_name(tags),  # unused when resuming: the run keeps its name
                tracking_uri=uri,
                tags=tags,
                run_id=run_id,
                artifact_location=artifact_location(uri),
            )
            _ = logger.experiment  # creates the experiment and the run now, not mid-training
            mark_model_training(logger.experiment, str(logger.experiment_id))
            if run_id is not None:  # a resumed run was left RUNNING (or KILLED) by the kill
                logger.experiment.update_run(run_id, status="RUNNING")
    except (MlflowException, OSError) as exc:
        raise mlflow_error(exc, uri, "opening a run") from None
    return logger


def derived_params(datamodule: ConvDataModule, uri: str) -> dict[str, str]:
    """Run params that come from the data and the environment, not from params.yaml."""
    manifest = datamodule.manifest
    return {
        "derived.tracking_uri": mask(uri),  # $MLFLOW_TRACKING_URI may override the param
        "derived.num_classes": str(manifest.num_classes),
        "derived.in_channels": str(manifest.channels),
        "derived.image_hw": str(list(manifest.image_hw)),
        "derived.train_size": str(datamodule.train_size),
        "derived.content_hash": manifest.content_hash,
    }


def run_datasets(params: Params, datamodule: ConvDataModule) -> list[Any]:
    """The MLflow dataset inputs of this training.

    See :func:`convpipe.tracking.provenance.dataset_inputs`.
    """
    origin = params.data.path
    if origin is None:
        origin = BUILTIN_SOURCES.get(params.data.source, params.data.source)
    return dataset_inputs(datamodule.manifest, datamodule.augmented, origin)


def log_artifacts(logger: MLFlowLogger, params: Params) -> None:
    """The data manifests (and augmentation pipeline), the model and the history."""
    client, run_id = logger.experiment, str(logger.run_id)
    client.log_artifact(run_id, str(Path(params.paths.prepared) / MANIFEST), "data")
    augmented = Path(params.paths.augmented)
    for name in (MANIFEST, PIPELINE_FILE):
        if (augmented / name).is_file():
            client.log_artifact(run_id, str(augmented / name), "data/augmented")
    client.log_artifact(run_id, params.paths.model, "model")
    client.log_artifact(run_id, params.paths.train_history, "plots")


# --------------------------------------------------------------------------- evaluate's part

METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request


def open_training_run(params: Params) -> tuple[MlflowClient, RunInfo]:
    """The client and run of the training, checked to exist before anything is computed.

    Raises:
        ConvpipeError: If the run record is missing, the server unreachable or the run unknown.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = RunInfo.load(params.paths.run_info)
    uri = tracking_uri(params.mlflow)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run.run_id)
    except (MlflowException, OSError) as exc:
        raise ConvpipeError(
            f"MLflow run {run.run_id} of the training not found ({type(exc).__name__})",
            f"at {mask(uri)} (the training logged to {run.tracking_uri})",
            "use the tracking URI of the training, or rerun `dvc repro train`",
        ) from None
    return client, run


def log_evaluation(
    client: MlflowClient, run_id: str, params: Params, metrics: Mapping[str, float]
) -> None:
    """Add the test metrics (batched) and evaluate's pictures and tables to the training's run.

    Args:
        client: From :func:`open_training_run`.
        run_id: The training's run.
        params: The validated params (``paths.*`` of evaluate's outputs, ``mlflow``).
        metrics: Flat metric names to values (``test/acc``-style keys allowed).

    Raises:
        ConvpipeError: If the store refuses them (one line, via :func:`mlflow_error`).
    """
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    paths = params.paths
    stamp = int(time.time() * 1000)
    values = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
    try:
        for start in range(0, len(values), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=values[start : start + METRICS_PER_BATCH])
        outputs = (  # evaluate's pictures, then its tables
            paths.confusion_png,
            paths.misclassified_png,
            paths.curves_png,
            paths.reliability_png,
            paths.roc_pr_png,
            paths.gradcam_png,
            paths.eval_metrics,
            paths.eval_per_class,
            paths.eval_calibration,
            paths.eval_roc,
            paths.eval_pr,
        )
        for path in outputs:
            client.log_artifact(run_id, path, "evaluation")
    except (MlflowException, OSError) as exc:
        raise mlflow_error(exc, tracking_uri(params.mlflow), f"logging to run {run_id}") from None


@contextmanager
def system_metrics(
    run_id: str, uri: str, seconds: int, node_id: str | None, resumed: bool
) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network, GPU) on the run while inside.

    MLflow's own monitor (``system/cpu_utilization_percentage``, ...), one sample every
    ``seconds``, under ``system/<node_id>/`` when one is given (several nodes), and a last one
    as it stops, for the unfinished interval. A resumed run continues the steps.
    ``seconds`` 0, or no run (DDP ranks other than 0), turns it off; a monitor that cannot
    start only says so: the training goes on.

    Args:
        run_id: The training's run ("" where this process has none).
        uri: Its tracking URI.
        seconds: ``runtime.system_metrics_seconds``.
        node_id: ``node<rank>`` with several nodes, else None.
        resumed: Whether the run continues an interrupted training.
    """
    if seconds <= 0 or not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    quiet = logging.getLogger("mlflow.system_metrics")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its start/stop lines are not the stage's news
    try:
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=seconds,
            resume_logging=resumed,
            node_id=node_id,
            tracking_uri=uri,
        )
        monitor.start()
    except Exception as exc:  # the figures are extras: never fail a training for them
        log.warning("no system metrics on the MLflow run: %s", exc)
        quiet.setLevel(level)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()
        _publish_last(monitor)
        quiet.setLevel(level)


def _publish_last(monitor: SystemMetricsMonitor) -> None:
    """Log one last sample of the system as the training ends.

    MLflow's loop takes a sample, waits an interval, then publishes it; stopped while waiting,
    it publishes nothing more. A training shorter than ``runtime.system_metrics_seconds`` got
    no system metrics at all. The sample it held is dropped here too: its time is long past
    (it would be charted at the end), and a first sample's CPU figure is psutil's 0. The new
    one's CPU figure covers the time since that sample: the unfinished interval.
    """
    try:
        for part in monitor.monitors:
            part.clear_metrics()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # the figures are extras: never fail a training for them
        log.warning("the last system metrics were not logged: %s", exc)

"""The evaluated model in MLflow: a pyfunc on raw images, a registry version, the champion.

The evaluate stage logs the checkpoint into the training's MLflow run as a pyfunc model that
takes raw uint8 images and preprocesses them as training did (scale to ``[0, 1]``, normalise
with the prepared data's mean and std), registers it as a new version of
``mlflow.registered_model``, and moves the alias :data:`CHAMPION` to that version only when it
beats the current champion *on the same test split* by McNemar's exact test (one-sided, at
``evaluate.promotion_alpha``): of the images exactly one of the two models gets right, the new
one must get right significantly more than half. A one-image improvement on 269 test images is
not a better model and does not move it. Each version keeps which test images it got right
(``promotion/<name>-v<version>/test_correct.npy`` in its run), the counts, the p-value and the
decision are tagged on the version (``promotion.*``) and said in one line. A version evaluated
on another test split (another ``data_content_hash``), or a champion without that record, is
never compared: the champion keeps the alias. So::

    mlflow models serve -m models:/convpipe-cnn@champion --env-manager local

serves the model that last won such a test.

The model is logged as MLflow "models from code": the model directory holds a short Python
file that builds :class:`ImageClassifier`, a copy of convpipe's source (``code/convpipe``,
which MLflow puts first on ``sys.path``), the Lightning checkpoint (loaded with
``weights_only=True``) and the prepared data's ``manifest.json``. Loading it unpickles
nothing (MLflow 3.17 refuses cloudpickled pyfunc models by default anyway). Its
``requirements.txt`` pins the libraries convpipe needs at serving time, so ``--env-manager
local`` serves it from the project's environment and ``virtualenv``/``uv`` could rebuild one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
from mlflow.entities import Run

from convpipe.data.manifest import MANIFEST, Manifest
from convpipe.redact import mask
from convpipe.tracking.pyfunc import (
    SERVING,
    Serving,
    image_signature,
    model_input,
    write_serving,
)
from convpipe.tracking.runs import METRICS_PER_BATCH
from convpipe.tracking.store import mlflow_error, store_lock

log = logging.getLogger("convpipe")


CHAMPION = "champion"

#: Model-version (and LoggedModel) tag holding the test accuracy the champion rule compares.
ACCURACY_TAG = "test_accuracy"
#: The MLflow metric evaluate logs that accuracy as.
TEST_ACCURACY = "test/accuracy"

#: Tag naming the prepared data the accuracy was measured on (its manifest content hash).
DATA_TAG = "data_content_hash"

#: Tag with the sha256 of the model's class names in label order: a version that predicts
#: other classes (a fine-tune on new data) never takes the alias from the champion, whose
#: consumers expect its labels.
CLASSES_TAG = "class_names_sha256"


def classes_digest(class_names: list[str]) -> str:
    """The :data:`CLASSES_TAG` value: sha256 of the class names, JSON-encoded in label order."""
    return hashlib.sha256(json.dumps(list(class_names)).encode("utf-8")).hexdigest()


#: Name of the logged model: MLflow 3 lists its files in the run under ``classifier/`` (and
#: ``runs:/<run_id>/classifier`` loads it). Not ``model``: the train stage's checkpoint is there.
MODEL_NAME = "classifier"

#: Distributions the pyfunc imports at serving time (convpipe itself travels as code), pinned
#: to the installed versions. Listing them skips MLflow's requirement inference, which loads the
#: model in a subprocess and takes seconds.
SERVE_REQUIREMENTS = (
    "mlflow",
    "torch",
    "lightning",
    "torchmetrics",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "albumentations",
    "opencv-python-headless",
    "matplotlib",
)

#: convpipe's own source, saved with the model: a registered version keeps loading and
#: predicting with the code it was evaluated with after the project's code moves on (MLflow puts
#: the model's ``code/`` folder first on ``sys.path`` before it runs the model's code file).
PACKAGE = Path(__file__).resolve().parents[1]  # src/convpipe, whole

_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

_CODE_FILE = "convpipe_classifier.py"

_CODE = '''\
"""convpipe's image classifier as an MLflow pyfunc (models from code: nothing is unpickled)."""

import mlflow

from convpipe.tracking.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
'''


#: The run artifact folder holding each version's per-image record (``<name>-v<version>``).
RECORD_DIR = "promotion"
RECORD_FILE = "test_correct.npy"


class Paired(NamedTuple):
    """McNemar's exact test of a new version against the champion on the same test images.

    Attributes:
        new_only: Images only the new version gets right.
        champion_only: Images only the champion gets right.
        p_value: One-sided: the chance of ``new_only`` or more of the ``new_only +
            champion_only`` discordant images if both models were as good (binomial, 1/2).
    """

    new_only: int
    champion_only: int
    p_value: float


def mcnemar(new: np.ndarray, champion: np.ndarray) -> Paired:
    """McNemar's exact (binomial) test that ``new`` is right more often than ``champion``.

    Args:
        new: ``(N,)`` bool, which test images the new version classifies right.
        champion: ``(N,)`` bool, the same for the champion, on the same images in the same order.
    """
    from scipy.stats import binomtest

    new_only = int(np.count_nonzero(new & ~champion))
    champion_only = int(np.count_nonzero(~new & champion))
    discordant = new_only + champion_only
    p_value = 1.0 if discordant == 0 else binomtest(new_only, discordant, 0.5, "greater").pvalue
    return Paired(new_only, champion_only, float(p_value))


def tag_accuracy(tags: Mapping[str, str]) -> float | None:
    """The test accuracy recorded in a model version's tags; None if absent or not a number."""
    try:
        value = float(tags[ACCURACY_TAG])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


class Registration(NamedTuple):
    """What :func:`log_and_register` did.

    Attributes:
        name: The registered model.
        version: The new version.
        accuracy: Its test accuracy.
        champion: The version holding the alias afterwards.
        champion_accuracy: The accuracy of the champion before this version (None: no
            champion yet, or one without a recorded accuracy).
        moved: Whether the alias moved to the new version.
        seconds: Time spent logging and registering.
        paired: The test against the champion (None: no champion, or not comparable).
        why: The decision in words.
    """

    name: str
    version: str
    accuracy: float
    champion: str
    champion_accuracy: float | None
    moved: bool
    seconds: float
    paired: Paired | None
    why: str


def requirements() -> list[str]:
    """:data:`SERVE_REQUIREMENTS` pinned to the installed versions (missing ones unpinned).

    A local version label is dropped (``torch==2.13.0``, not ``2.13.0+cpu``): PyPI, where an
    environment manager would look, has no such label.
    """
    pinned = []
    for name in SERVE_REQUIREMENTS:
        try:
            version = importlib_metadata.version(name).split("+")[0]
        except importlib_metadata.PackageNotFoundError:
            pinned.append(name)
        else:
            pinned.append(f"{name}=={version}")
    return pinned


@contextmanager
def _fluent_api(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which ``Model.log`` uses) at ``uri``, without progress bars.

    MLflow's own ``_use_tracking_uri`` restores the caller's setting exactly (also "not set",
    so ``$MLFLOW_TRACKING_URI`` keeps working afterwards), which the public getter and setter
    cannot. The bars would draw on the stage's log while MLflow copies the model it validates.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    previous_bar = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous_bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = previous_bar


def _log_model(
    run: Run,
    name: str,
    checkpoint: str | Path,
    manifest: Manifest,
    examples: np.ndarray,
    tags: dict[str, str],
    serving: Serving,
) -> tuple[str, str]:
    """Log the pyfunc into ``run``'s experiment and register it; the version and model id.

    The LoggedModel is created explicitly in the run's experiment: left to ``Model.log``, it
    would go to the active (by default the ``Default``) experiment, whose artifacts live
    wherever that experiment was first created.

    ``Model.log`` is not given the run: with one, it reads the whole history of every metric
    of the run, one request per metric (about 70 after a training and evaluate), to link
    those of step 0 to the model: over a minute against an MLflow server with basic auth,
    which checks the password on every request. :func:`_link_run` links the run instead.
    """
    logged = mlflow.initialize_logged_model(
        name=MODEL_NAME,
        source_run_id=run.info.run_id,
        tags=tags,
        # the run's params as trained, with how this model serves (evaluate's, now)
        params={
            **run.data.params,
            "evaluate.tta": serving.tta,
            "evaluate.temperature": str(serving.temperature),
        },
        experiment_id=run.info.experiment_id,
    )
    with tempfile.TemporaryDirectory(prefix="convpipe-model-") as tmp:
        code = Path(tmp) / _CODE_FILE
        code.write_text(_CODE, encoding="utf-8")
        (Path(tmp) / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
        # an artifact, not ``model_config``: MLflow would also log that as a run param ``tta``
        write_serving(Path(tmp) / SERVING, serving)
        info = mlflow.models.Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            name=MODEL_NAME,
            model_id=logged.model_id,
            registered_model_name=name,
            tags=tags,
            python_model=str(code),
            artifacts={
                "checkpoint": str(checkpoint),
                "manifest": str(Path(tmp) / MANIFEST),
                "serving": str(Path(tmp) / SERVING),
            },
            code_paths=[str(PACKAGE)],
            signature=image_signature(manifest.channels, manifest.image_hw),
            input_example=model_input(examples),
            pip_requirements=requirements(),
        )
    return str(info.registered_model_version), logged.model_id


def _link_run(
    client: Any, run_id: str, logged: tuple[str, str], metrics: Mapping[str, float]
) -> str:
    """Record the model as the run's output, with evaluate's test ``metrics`` linked to it.

    What ``Model.log`` does for a run it is given, in two requests rather than one per metric
    of the run (see :func:`_log_model`), and with the metrics that describe this model
    (not, as there, whatever else the run logged at step 0: the first epoch's).

    Returns:
        The version number, from ``logged`` (version, model id).
    """
    from mlflow.entities import LoggedModelOutput, Metric

    version, model_id = logged
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    stamp = int(time.time() * 1000)
    linked = [
        Metric(key, float(value), stamp, 0, model_id=model_id) for key, value in metrics.items()
    ]
    for start in range(0, len(linked), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=linked[start : start + METRICS_PER_BATCH])
    return version


class _Decision(NamedTuple):
    champion: str
    champion_accuracy: float | None
    moved: bool
    paired: Paired | None
    why: str


class Candidate(NamedTuple):
    """What the new version is compared on.

    Attributes:
        version: The new version.
        accuracy: Its test accuracy.
        classes: Its :data:`CLASSES_TAG`.
        data: The prepared data's content hash (its test split included).
        correct: ``(N,)`` bool, which test images it gets right, in the split's order.
    """

    version: str
    accuracy: float
    classes: str
    data: str
    correct: np.ndarray


def _record_path(name: str, version: str) -> str:
    return f"{RECORD_DIR}/{name}-v{version}"


def _keep_record(client: Any, run_id: str, name: str, version: str, correct: np.ndarray) -> None:
    """Log which test images ``version`` gets right into its run (for later comparisons)."""
    with tempfile.TemporaryDirectory(prefix="convpipe-record-") as tmp:
        path = Path(tmp) / RECORD_FILE
        np.save(path, np.asarray(correct, dtype=bool), allow_pickle=False)
        client.log_artifact(run_id, str(path), _record_path(name, version))


def _champion_record(client: Any, name: str, held: str) -> np.ndarray | None:
    """The champion's per-image record, or None if it has none (registered before it existed)."""
    run_id = client.get_model_version(name, held).run_id
    with tempfile.TemporaryDirectory(prefix="convpipe-record-") as tmp:
        try:
            path = client.download_artifacts(
                run_id, f"{_record_path(name, held)}/{RECORD_FILE}", tmp
            )
            return np.asarray(np.load(path, allow_pickle=False), dtype=bool)
        except Exception:  # missing: an older version (or its run's artifacts are gone)
            return None


def _compare(
    client: Any,
    name: str,
    held: str,
    new: Candidate,
    champion_tags: Mapping[str, str],
    alpha: float,
) -> tuple[bool, Paired | None, str]:
    """Whether ``new`` takes the alias from champion version ``held``, the test, and why."""
    if champion_tags.get(DATA_TAG) != new.data:
        return False, None, f"not compared: version {held} was evaluated on another test split"
    record = _champion_record(client, name, held)
    if record is None or record.shape != new.correct.shape:
        return False, None, f"not compared: version {held} has no per-image record of this split"
    paired = mcnemar(new.correct, record)
    test = (
        f"McNemar against version {held}: {paired.new_only} test images only it gets right, "
        f"{paired.champion_only} only version {held} does, p = {paired.p_value:.4g}"
    )
    if paired.p_value < alpha:
        return True, paired, f"{test} < {alpha}"
    return False, paired, f"{test} >= {alpha}"


def _promote(client: Any, name: str, new: Candidate, alpha: float) -> _Decision:
    """Move :data:`CHAMPION` to the new version if it beats the current champion (see module).

    A version of other classes than the champion's (:data:`CLASSES_TAG`) never does: it is
    another model under the same name. The caller holds the store lock, so no other local
    evaluate reads the champion between this one's read and set.
    """
    version = new.version
    held = client.get_registered_model(name).aliases.get(CHAMPION)
    if held is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return _Decision(version, None, True, None, "no champion before")
    held = str(held)
    champion_tags = client.get_model_version(name, held).tags
    champion_accuracy = tag_accuracy(champion_tags)
    if held == version:
        return _Decision(held, champion_accuracy, False, None, "it is the champion")
    if champion_tags.get(CLASSES_TAG, new.classes) != new.classes:
        log.warning(
            "version %s of %s predicts other classes than champion version %s: the champion "
            "keeps the alias (give a model of new classes its own mlflow.registered_model)",
            version,
            name,
            held,
        )
        return _Decision(held, champion_accuracy, False, None, "other classes")
    moved, paired, why = _compare(client, name, held, new, champion_tags, alpha)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
    return _Decision(version if moved else held, champion_accuracy, moved, paired, why)


def _tag_decision(client: Any, name: str, version: str, decision: _Decision) -> None:
    """Record the test and the decision on the new version (``promotion.*`` tags)."""
    tags = {
        "promotion.decision": "promoted" if decision.moved else "kept",
        "promotion.why": decision.why,
    }
    if decision.paired is not None:
        tags["promotion.new_only"] = str(decision.paired.new_only)
        tags["promotion.champion_only"] = str(decision.paired.champion_only)
        tags["promotion.p_value"] = repr(decision.paired.p_value)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def log_and_register(
    uri: str,
    run_id: str,
    name: str,
    checkpoint: str | Path,
    manifest: Manifest,
    examples: np.ndarray,
    metrics: Mapping[str, float],
    serving: Serving,
    correct: np.ndarray,
    alpha: float,
) -> Registration:
    """Log the model into the training's run, register a version, maybe move the champion.

    Args:
        uri: The tracking (and registry) URI.
        run_id: The training's run.
        name: The registered model (``mlflow.registered_model``).
        checkpoint: The Lightning checkpoint to serve.
        manifest: The prepared data's manifest (image geometry, class names, mean, std).
        examples: A few uint8 test images ``(N, H, W, C)``: the model's input example.
        metrics: The test metrics evaluate logged into the run (MLflow keys): linked to the
            logged model; ``test/accuracy`` is tagged on the version and compared with the
            champion's.
        serving: ``evaluate.tta``, the test-time augmentation that accuracy was measured with,
            and the temperature of ``evaluate.calibration``: the served model predicts with
            them too (its ``serving.json`` artifact).
        correct: ``(N,)`` bool, which test images it classified right, in the split's order.
        alpha: ``evaluate.promotion_alpha``, the level of the paired test against the champion.

    Returns:
        The new version and what happened to the alias.

    Raises:
        ConvpipeError: If MLflow fails (one line, the URI's password masked).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    accuracy = float(metrics[TEST_ACCURACY])
    classes = classes_digest(manifest.class_names)
    tags = {
        ACCURACY_TAG: repr(float(accuracy)),
        DATA_TAG: manifest.content_hash,
        CLASSES_TAG: classes,
    }
    try:
        client = MlflowClient(tracking_uri=uri)  # registry: as the fluent API resolves it
        run = client.get_run(run_id)
        with _fluent_api(uri):
            logged = _log_model(run, name, checkpoint, manifest, examples, tags, serving)
        version = _link_run(client, run_id, logged, metrics)
        _keep_record(client, run_id, name, version, correct)
        candidate = Candidate(version, accuracy, classes, manifest.content_hash, correct)
        with store_lock(uri):
            decision = _promote(client, name, candidate, alpha)
        _tag_decision(client, name, version, decision)
    except (MlflowException, OSError) as exc:
        raise mlflow_error(exc, uri, f"registering the model as {name!r}") from None
    champion, champion_accuracy, moved, paired, why = decision
    seconds = time.perf_counter() - start
    result = Registration(
        name, version, accuracy, champion, champion_accuracy, moved, seconds, paired, why
    )
    _report(result, uri)
    return result


def _report(result: Registration, uri: str) -> None:
    """One line: the new version, then the decision and why (the test's counts and p-value)."""
    where = f"{result.name} version {result.version} (test accuracy {result.accuracy:.4f})"
    if result.moved:
        log.info("registered %s: alias %s moved to it (%s)", where, CHAMPION, result.why)
    else:
        log.info(
            "registered %s: alias %s stays on version %s (%s)",
            where,
            CHAMPION,
            result.champion,
            result.why,
        )
    log.debug("logging and registering took %.1f s at %s", result.seconds, mask(uri))

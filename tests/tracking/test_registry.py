"""The model registry: the champion rule, the pyfunc against convpipe's predict, real serving.

Everything runs against real MLflow sqlite stores (absolute URIs) with a real, briefly trained
CNN on the digits; the serving test starts a real `mlflow models serve` process on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from torch.utils.data import DataLoader, TensorDataset

from convpipe.config.schema import Params
from convpipe.data.manifest import Manifest, load_split
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.errors import ConvpipeError
from convpipe.inference.predict import predict_images
from convpipe.models.checkpoint import load_model
from convpipe.tracking.pyfunc import Serving, image_signature, model_input, prediction_frame
from convpipe.tracking.registry import (
    ACCURACY_TAG,
    CHAMPION,
    CLASSES_TAG,
    DATA_TAG,
    classes_digest,
    log_and_register,
    mcnemar,
    tag_accuracy,
)
from convpipe.tracking.store import store_lock
from tests.helpers.factories import classifier_for, params_in, prepared
from tests.helpers.models import TINY_CONV, fit_and_save, model_section
from tests.helpers.project import make_project
from tests.helpers.servers import free_port, stop_server, wait_for_http

VENV_BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("new_only", "champion_only", "p_value"),
    [
        (1, 0, 0.5),  # one image better: as likely as a coin
        (10, 0, 0.5**10),
        (6, 2, 37 / 256),  # P(X >= 6) for X ~ Binomial(8, 1/2)
        (0, 0, 1.0),  # the same images right: nothing to tell them apart
        (0, 5, 1.0),
    ],
)
def test_mcnemar_is_the_exact_one_sided_binomial_test(
    new_only: int, champion_only: int, p_value: float
) -> None:
    both = 7  # images both get right (or wrong) do not count
    new = np.array([True] * new_only + [False] * champion_only + [True] * both)
    champion = np.array([False] * new_only + [True] * champion_only + [True] * both)
    assert mcnemar(new, champion) == (new_only, champion_only, pytest.approx(p_value))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({ACCURACY_TAG: "0.9851"}, 0.9851),
        ({ACCURACY_TAG: "1"}, 1.0),
        ({}, None),
        ({ACCURACY_TAG: "high"}, None),
        ({ACCURACY_TAG: "nan"}, None),
        ({ACCURACY_TAG: "inf"}, None),
        ({"other": "0.5"}, None),
    ],
)
def test_tag_accuracy(tags: dict[str, str], expected: float | None) -> None:
    assert tag_accuracy(tags) == expected


def test_image_signature_grayscale_and_colour() -> None:
    gray = image_signature(1, (8, 8)).to_dict()
    spec = json.loads(gray["inputs"])
    assert spec == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, 8, 8]}}]
    colour = json.loads(image_signature(3, (32, 24)).to_dict()["inputs"])
    assert colour[0]["tensor-spec"]["shape"] == [-1, 32, 24, 3]
    outputs = json.loads(gray["outputs"])
    assert [(o["name"], o["type"]) for o in outputs] == [
        ("class", "string"),
        ("probability", "double"),
        ("probabilities", "map"),
    ]
    assert outputs[2]["values"] == {"type": "double"}


def test_model_input_drops_only_a_single_channel() -> None:
    gray = np.zeros((2, 8, 8, 1), np.uint8)
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    assert model_input(gray).shape == (2, 8, 8)
    assert model_input(rgb).shape == (2, 8, 8, 3)


def test_prediction_frame_rows_by_hand() -> None:
    ranked = [
        [("dog", 0.7), ("cat", 0.2), ("eel", 0.1)],
        [("eel", 0.5), ("dog", 0.3), ("cat", 0.2)],
    ]
    frame = prediction_frame(ranked, ["cat", "dog", "eel"])
    assert list(frame.columns) == ["class", "probability", "probabilities"]
    assert frame["class"].tolist() == ["dog", "eel"]
    assert frame["probability"].tolist() == [0.7, 0.5]
    first = frame["probabilities"][0]
    assert first == {"cat": 0.2, "dog": 0.7, "eel": 0.1}
    assert list(first) == ["cat", "dog", "eel"]  # class order, not rank order
    assert prediction_frame([], ["a", "b"]).shape == (0, 3)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Trained:
    """Prepared digits, a CNN trained a few epochs on them, and a store holding its run."""

    params: Params
    manifest: Manifest
    uri: str
    run_id: str
    test_x: np.ndarray  # uint8 (N, 8, 8, 1)
    test_y: np.ndarray


def _train(params: Params, manifest: Manifest, root: Path) -> None:
    """Five epochs on the prepared digits: a model whose test predictions mean something."""
    x, y = load_split(params.paths.prepared, manifest, "train")
    torch.manual_seed(0)
    model = classifier_for(params, manifest, len(y), max_epochs=5, reg_lambda=0.0)
    inputs = normalize_batch(torch.from_numpy(np.array(x)), manifest.mean, manifest.std)
    loader = DataLoader(TensorDataset(inputs, torch.from_numpy(y)), batch_size=64, shuffle=True)
    fit_and_save(model, loader, root, params.paths.model, max_epochs=5)


@pytest.fixture(scope="module")
def trained(raw_params, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("registry")
    network = model_section(TINY_CONV, [32], 0.0)
    _, params = params_in(raw_params, root, model=network, mlflow_store=True)
    manifest = prepared(params)
    _train(params, manifest, root)
    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", (root / "mlruns").as_uri())
    run = client.create_run(experiment)  # the training's run, as the train stage leaves it
    client.log_param(run.info.run_id, "train.lr", "0.003")
    client.set_terminated(run.info.run_id)
    x, y = load_split(params.paths.prepared, manifest, "test")
    return Trained(params, manifest, uri, run.info.run_id, np.array(x), np.array(y))


def _right(trained: Trained, count: int, offset: int = 0) -> np.ndarray:
    """A per-image record: ``count`` test images right, from image ``offset`` on (cyclic)."""
    correct = np.zeros(len(trained.test_y), dtype=bool)
    correct[(np.arange(count) + offset) % len(correct)] = True
    return correct


def _register(
    trained: Trained,
    name: str,
    accuracy: float,
    tta: str = "none",
    correct: np.ndarray | None = None,
    manifest: Manifest | None = None,
    temperature: float = 1.0,
):
    """Register the trained checkpoint as if evaluated to ``accuracy`` (its first images right)."""
    if correct is None:
        correct = _right(trained, round(accuracy * len(trained.test_y)))
    return log_and_register(
        trained.uri,
        trained.run_id,
        name,
        trained.params.paths.model,
        manifest or trained.manifest,
        trained.test_x[:2],
        {"test/accuracy": accuracy, "test/loss": 0.25},
        Serving(tta, temperature),
        correct,
        0.05,
    )


def _champion(client: MlflowClient, name: str) -> str | None:
    held = client.get_registered_model(name).aliases.get(CHAMPION)  # an int from sqlite
    return None if held is None else str(held)


@pytest.fixture(scope="module")
def champion(trained: Trained) -> str:
    """One version registered under "digits-cnn": the champion."""
    name = "digits-cnn"
    _register(trained, name, 0.9)
    return name


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """``models:/`` URIs resolve through the fluent API's tracking URI."""
    with _use_tracking_uri(uri):
        yield


# --------------------------------------------------------------------------- registry


def test_alias_moves_only_when_a_paired_test_says_better(trained: Trained, caplog) -> None:
    """A one-image gain is not promoted, a clear one is; another test split is not compared."""
    client = MlflowClient(trained.uri)
    name = "alias-order"
    n = len(trained.test_y)
    other = trained.manifest.model_copy(update={"content_hash": "another-split"})
    steps = [  # (images right, where they start, manifest, champion after, moved, said)
        (200, 0, None, "1", True, "no champion before"),
        (
            201,
            0,
            None,
            "1",
            False,
            "1 test images only it gets right, 0 only version 1 does, p = 0.5 >= 0.05",
        ),
        (185, 0, None, "1", False, "p = 1 >= 0.05"),
        (
            215,
            0,
            None,
            "4",
            True,
            "15 test images only it gets right, 0 only version 1 does, p = 3.052e-05 < 0.05",
        ),
        (215, 1, None, "4", False, "1 test images only it gets right, 1 only version 4 does"),
        (260, 0, other, "4", False, "not compared: version 4 was evaluated on another test split"),
    ]
    for i, (right, offset, manifest, champion, moved, said) in enumerate(steps, start=1):
        caplog.clear()
        accuracy = right / n
        with caplog.at_level(logging.INFO, logger="convpipe"):
            result = _register(
                trained, name, accuracy, "none", _right(trained, right, offset), manifest
            )
        assert result.version == str(i)
        assert (result.champion, result.moved) == (champion, moved), result.why
        assert _champion(client, name) == champion
        version = client.get_model_version(name, str(i))
        assert version.tags[ACCURACY_TAG] == repr(accuracy)
        assert version.tags[DATA_TAG] == (manifest or trained.manifest).content_hash
        assert version.tags["promotion.decision"] == ("promoted" if moved else "kept")
        if result.paired is not None:  # the counts and the p-value are on the version
            assert version.tags["promotion.new_only"] == str(result.paired.new_only)
            assert version.tags["promotion.champion_only"] == str(result.paired.champion_only)
            assert float(version.tags["promotion.p_value"]) == result.paired.p_value
        assert version.run_id == trained.run_id
        line = caplog.messages[-1]
        assert f"{name} version {i} (test accuracy {accuracy:.4f})" in line
        assert said in line, line
        if moved:
            assert "alias champion moved to it" in line
        else:
            assert f"alias champion stays on version {champion}" in line
        assert result.seconds > 0
    assert client.get_run(trained.run_id).info.status == "FINISHED"


def test_logged_model_sits_in_the_run_and_unpickles_nothing(trained: Trained, champion) -> None:
    client = MlflowClient(trained.uri)
    version = client.get_model_version_by_alias(champion, CHAMPION)
    model_id = version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    run = client.get_run(trained.run_id)
    assert logged.source_run_id == trained.run_id
    assert version.run_id == trained.run_id  # the registry's "source run" link
    assert logged.experiment_id == run.info.experiment_id  # not the Default experiment
    # the run's params, with the TTA it serves with; the run itself gets no new param
    assert logged.params == {
        "train.lr": "0.003",
        "evaluate.tta": "none",
        "evaluate.temperature": "1.0",
    }
    assert client.get_run(trained.run_id).data.params == {"train.lr": "0.003"}
    assert logged.tags[ACCURACY_TAG] == "0.9"
    assert model_id in [out.model_id for out in run.outputs.model_outputs]
    local = Path(logged.artifact_location.removeprefix("file://"))
    store_root = Path(trained.uri.removeprefix("sqlite:///")).parent
    assert local.is_relative_to(store_root / "mlruns")  # the experiment's, not ./mlruns
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "artifacts/model.ckpt",
        "artifacts/manifest.json",
        "artifacts/serving.json",
    } <= files
    assert "convpipe_classifier.py" in files  # models from code ...
    assert {
        "code/convpipe/tracking/pyfunc.py",
        "code/convpipe/models/module.py",
    } <= files  # ... with its code
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)  # ... nothing pickled
    requirements = (local / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in requirements  # given, not inferred (slow)
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements  # no +cpu label
    example = json.loads((local / "serving_input_example.json").read_text())
    assert np.array(example["inputs"]).shape == (2, 8, 8)


def test_pyfunc_equals_convpipe_predict(trained: Trained, champion) -> None:
    with tracking(trained.uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{champion}@{CHAMPION}")
    schema = pyfunc.metadata.get_input_schema()
    assert schema.is_tensor_spec() and schema.inputs[0].shape == (-1, 8, 8)
    images = trained.test_x[:40]
    out = pyfunc.predict(images[..., 0])  # raw uint8 (N, H, W), as a client sends them
    assert isinstance(out, pd.DataFrame) and len(out) == 40
    m = trained.manifest
    model = load_model(trained.params.paths.model)
    expected = predict_images(model, images, m.mean, m.std, top_k=10, tta="none")
    assert out["class"].tolist() == [top[0][0] for top in expected]
    np.testing.assert_allclose(out["probability"], [top[0][1] for top in expected], rtol=1e-6)
    for row, top in zip(out["probabilities"], expected, strict=True):
        assert list(row) == m.class_names
        assert row == pytest.approx(dict(top), rel=1e-6)
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
    # the model learned something: most classes right
    assert (out["class"].astype(int).to_numpy() == trained.test_y[:40]).mean() > 0.8


def test_registered_model_predicts_with_the_evaluated_tta(trained: Trained) -> None:
    version = _register(trained, "tta-cnn", 0.9, tta="flip").version
    with tracking(trained.uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/tta-cnn/{version}")
    images = trained.test_x[:40]
    out = pyfunc.predict(images[..., 0])
    m = trained.manifest
    model = load_model(trained.params.paths.model)
    flipped = predict_images(model, images, m.mean, m.std, top_k=10, tta="flip")
    plain = predict_images(model, images, m.mean, m.std, top_k=10, tta="none")
    for row, top in zip(out["probabilities"], flipped, strict=True):
        assert row == pytest.approx(dict(top), rel=1e-6)
    # the flip changed the served probabilities: the config reached the model
    assert any(
        dict(a) != pytest.approx(dict(b), rel=1e-6) for a, b in zip(flipped, plain, strict=True)
    )


LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
import convpipe
out = model.predict(np.zeros((1, 8, 8), np.uint8))
print(json.dumps({"convpipe": convpipe.__file__, "class": out["class"][0]}))
"""


@pytest.mark.subprocess
def test_a_fresh_process_predicts_with_the_code_saved_in_the_model(
    trained: Trained, champion, tmp_path: Path
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.uri}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{champion}@{CHAMPION}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # not the project's src/convpipe: a registered version outlives changes to the code
    assert Path(out["convpipe"]).parts[-3:] == ("code", "convpipe", "__init__.py")
    assert out["class"] in trained.manifest.class_names


def test_pyfunc_refuses_other_shapes_and_dtypes(trained: Trained, champion) -> None:
    with tracking(trained.uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{champion}@{CHAMPION}")
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        pyfunc.predict(np.zeros((1, 7, 7), np.uint8))
    with pytest.raises(mlflow.exceptions.MlflowException, match="dtype"):
        pyfunc.predict(np.zeros((1, 8, 8), np.float32))


def test_a_champion_without_a_per_image_record_keeps_the_alias(trained: Trained, caplog) -> None:
    """A champion registered before records existed cannot be tested against: it stays."""
    client = MlflowClient(trained.uri)
    name = "hand-picked"
    _register(trained, name, 0.5)
    artifacts = Path(client.get_run(trained.run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / "promotion" / f"{name}-v1")  # as an older version has none
    with caplog.at_level(logging.INFO, logger="convpipe"):
        result = _register(trained, name, 0.99)
    assert (result.version, result.champion, result.moved) == ("2", "1", False)
    assert _champion(client, name) == "1"
    assert "not compared: version 1 has no per-image record of this split" in caplog.text


REGISTER = """
import sys
import numpy as np
from convpipe.data.manifest import load_manifest, load_split
from convpipe.tracking.pyfunc import Serving
from convpipe.tracking.registry import log_and_register
uri, run_id, name, ckpt, prepared = sys.argv[1:6]
manifest = load_manifest(prepared)
x, _ = load_split(prepared, manifest, "test")
right = np.arange(len(x)) < round(float(sys.argv[6]) * len(x))
log_and_register(uri, run_id, name, ckpt, manifest, np.array(x[:2]),
                 {"test/accuracy": float(sys.argv[6])}, Serving("none"), right, 0.05)
"""


@pytest.mark.subprocess
def test_the_alias_decision_waits_for_the_store_lock(trained: Trained, tmp_path: Path) -> None:
    client = MlflowClient(trained.uri)
    name = "locked"
    _register(trained, name, 0.5)
    paths = trained.params.paths
    args = [trained.uri, trained.run_id, name, paths.model, paths.prepared, "0.8"]
    log = tmp_path / "register.log"
    with store_lock(trained.uri), open(log, "w") as err:  # we are another evaluate, mid-way
        proc = subprocess.Popen([sys.executable, "-c", REGISTER, *args], stderr=err)
        try:
            deadline = time.monotonic() + 120
            while len(client.search_model_versions(f"name = '{name}'")) < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(1.0)  # version 2 exists; deciding on the alias must wait for the lock
            assert proc.poll() is None and _champion(client, name) == "1"
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert _champion(client, name) == "2"


def test_registered_model_serves_with_the_fitted_temperature(trained: Trained) -> None:
    version = _register(trained, "calibrated-cnn", 0.9, temperature=2.5).version
    with tracking(trained.uri):
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/calibrated-cnn/{version}"))
        pyfunc = mlflow.pyfunc.load_model(f"models:/calibrated-cnn/{version}")
    # stated in the served model's own metadata
    served = json.loads(next(folder.rglob("serving.json")).read_text())
    assert served == {"tta": "none", "temperature": 2.5}
    images = trained.test_x[:40]
    out = pyfunc.predict(images[..., 0])
    m = trained.manifest
    model = load_model(trained.params.paths.model)
    raw = predict_images(model, images, m.mean, m.std, top_k=10, tta="none")
    model.temperature = 2.5
    calibrated = predict_images(model, images, m.mean, m.std, top_k=10, tta="none")
    for row, top, plain in zip(out["probabilities"], calibrated, raw, strict=True):
        assert row == pytest.approx(dict(top), rel=1e-6)
        assert plain[0][0] == top[0][0]  # the same class: only the confidence changed
    assert max(p[0][1] for p in calibrated) < max(p[0][1] for p in raw)  # softer at T > 1


def test_registry_failure_is_one_user_error_line(trained: Trained) -> None:
    with pytest.raises(ConvpipeError) as info:
        log_and_register(
            trained.uri,
            "f" * 32,  # a run the store does not have
            "nowhere",
            trained.params.paths.model,
            trained.manifest,
            trained.test_x[:2],
            {"test/accuracy": 0.5},
            Serving("none"),
            _right(trained, 10),
            0.05,
        )
    line = info.value.line()
    assert line.startswith("convpipe: error: MLflow failed while registering the model")
    assert "\n" not in line and trained.uri in line
    assert MlflowClient(trained.uri).search_registered_models("name = 'nowhere'") == []


# --------------------------------------------------------------------------- serving


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextlib.contextmanager
def serving(uri: str, model: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` on a free 127.0.0.1 port; its process group is ended afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
        "MLFLOW_TRACKING_URI": uri,
    }
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(proc, f"{url}/ping", log, 120)
        yield url
    finally:
        stop_server(proc)  # the CLI and its uvicorn child: their own group


@pytest.mark.slow
def test_served_champion_classifies_a_test_image(trained: Trained, champion, tmp_path) -> None:
    m = trained.manifest
    ranked = predict_images(
        load_model(trained.params.paths.model), trained.test_x, m.mean, m.std, 1, "none"
    )
    sure = [
        i
        for i, top in enumerate(ranked)
        if top[0][1] > 0.95 and top[0][0] == m.class_names[trained.test_y[i]]
    ]
    assert sure, "the fixture model should classify some test image confidently"
    i = sure[0]
    image = trained.test_x[i, ..., 0]
    with serving(trained.uri, f"models:/{champion}@{CHAMPION}", tmp_path / "serve.log") as url:
        status, body = _post(f"{url}/invocations", {"inputs": [image.tolist()]})
        assert status == 200, body
        (prediction,) = body["predictions"]
        assert prediction["class"] == m.class_names[trained.test_y[i]]
        assert prediction["probability"] == pytest.approx(ranked[i][0][1], rel=1e-5)
        assert list(prediction["probabilities"]) == m.class_names
        # the signature guards the endpoint: a wrong image size is a 400, not a crash
        status, body = _post(f"{url}/invocations", {"inputs": [[[0] * 7] * 7]})
        assert status == 400 and "shape" in body["message"]


# --------------------------------------------------------------------------- DVC


@pytest.mark.slow
def test_dvc_repro_registers_a_champion_and_exp_run_compares(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    project.set_params(
        **{
            "train.max_epochs": 3,
            "model.conv": TINY_CONV,
            "model.hidden": [16],
            "augment.copies": 0,
        }
    )
    project.run("git", "commit", "-qam", "small")
    project.run("dvc", "repro")
    root = project.root
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    name = "convpipe-cnn"
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    first = json.loads((root / "metrics/eval.json").read_text())["accuracy"]
    version = client.get_model_version_by_alias(name, CHAMPION)
    assert str(version.version) == "1" and version.run_id == run_id
    assert float(version.tags[ACCURACY_TAG]) == pytest.approx(first)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert Path(logged.artifact_location.removeprefix("file://")).is_relative_to(root / "mlruns")
    # MLflow 3 lists the logged model in the run beside the train stage's checkpoint (its
    # models:/ lookup goes through the fluent API's URI, whatever the client's)
    with tracking(uri):
        assert {f.path for f in client.list_artifacts(run_id, "model")} == {"model/model.ckpt"}
        listed = {f.path for f in client.list_artifacts(run_id, "classifier")}
    assert "classifier/MLmodel" in listed

    out = project.run("dvc", "exp", "run", "-S", "train.lr=0.01")
    second = json.loads((root / "metrics/eval.json").read_text())["accuracy"]
    assert client.get_model_version(name, "2").tags[ACCURACY_TAG] == repr(second)
    expected = "2" if second > first else "1"
    assert _champion(client, name) == expected
    verb = "moved to it" if expected == "2" else "stays on version 1"
    assert f"alias champion {verb}" in out.stdout + out.stderr


def test_a_version_of_other_classes_never_takes_the_alias(trained: Trained, caplog) -> None:
    client = MlflowClient(trained.uri)
    name = "alias-classes"
    _register(trained, name, 0.5)
    renamed = trained.manifest.model_copy(
        update={"class_names": [f"c{i}" for i in range(trained.manifest.num_classes)]}
    )
    other = dataclasses.replace(trained, manifest=renamed)
    with caplog.at_level(logging.WARNING, logger="convpipe"):
        result = _register(other, name, 0.99)
    assert (result.version, result.champion, result.moved) == ("2", "1", False)
    assert _champion(client, name) == "1"
    assert "predicts other classes than champion version 1" in caplog.text
    tags = [client.get_model_version(name, v).tags[CLASSES_TAG] for v in ("1", "2")]
    assert tags == [
        classes_digest(trained.manifest.class_names),
        classes_digest(renamed.class_names),
    ]
    assert _register(trained, name, 0.6).moved  # the same classes still compete on accuracy


def test_init_from_a_registered_model_reads_the_given_store_not_the_default(
    trained: Trained, champion: str, tmp_path: Path
) -> None:
    # a fine-tuning project elsewhere, whose mlflow.tracking_uri names the trained project's
    # store: MLflow's own models:/ download would look in ./mlflow.db (its default registry)
    from convpipe.models.transfer import read_weights
    from convpipe.tracking.init_source import fetched

    with contextlib.chdir(tmp_path):
        with fetched(f"models:/{champion}@champion", trained.uri) as weights:
            assert read_weights(weights.path)  # a readable checkpoint of the champion
            assert weights.run_id == trained.run_id
        assert not (tmp_path / "mlflow.db").exists()  # no stray default store was made

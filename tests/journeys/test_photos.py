"""The "Your photos" journey of docs/data.md with the real CLIs, on photos of mixed sizes.

``convpipe recipe params/photos.yaml``, ``data.path`` pointed at the folder, ``dvc repro``: a
residual network is trained, evaluated and registered; then ``convpipe predict`` and
``convpipe export`` run on it and the registered model serves the same classes. The step
budget is cut (``train.max_steps``) so the test takes a minute: the recipe's full run is
``make bench-photos``'s.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from PIL import Image

from convpipe.models.checkpoint import load_model
from tests.helpers.project import Project, documented_commands, make_project

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

#: (width, height) of the photos: landscape, portrait, square, tiny and large
SIZES = [(120, 80), (64, 96), (75, 75), (40, 30), (300, 200)]


def write_photos(root) -> None:
    """``root/<class>/*.jpg``: two classes a colour and a layout apart, at mixed sizes."""
    rng = np.random.default_rng(0)
    for name, colour in (("poppy", (200, 40, 30)), ("cornflower", (40, 70, 200))):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(60):  # 84 training photos: at least the batch of 64
            width, height = SIZES[k % len(SIZES)]
            pixels = rng.integers(90, 160, (height, width, 3)).astype(np.uint8)
            cy, cx, r = height // 2, width // 2, min(width, height) // 3
            yy, xx = np.ogrid[:height, :width]
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
            Image.fromarray(pixels).save(folder / f"{name}_{k:02d}.jpg", quality=90)


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> Project:
    project = make_project(tmp_path_factory.mktemp("photos"))
    write_photos(project.root / "data" / "photos")
    commands = documented_commands("photos")
    project.sh(commands[0])  # convpipe recipe params/photos.yaml
    # a minute, not the recipe's 2,000 steps; everything else as the recipe says
    project.set_params(**{"train.max_steps": 24, "train.warmup_epochs": 0.5})
    for command in commands[1:]:
        project.sh(command)
    return project


def test_the_recipe_trains_evaluates_and_registers_a_residual_model(journey) -> None:
    model = load_model(journey.root / "models" / "model.ckpt")
    assert len(model.model_params.stages) == 4 and model.model_params.global_pool == "avg"
    manifest = json.loads((journey.root / "data/prepared/manifest.json").read_text())
    assert manifest["image_size"] == [64, 64] and manifest["resize"] == "crop"
    assert manifest["channels"] == 3 and manifest["class_names"] == ["cornflower", "poppy"]
    evaluated = json.loads((journey.root / "metrics" / "eval.json").read_text())
    assert evaluated["accuracy"] >= 0.9  # a colour apart: learnt even in 24 steps
    client = mlflow.MlflowClient(f"sqlite:///{journey.root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("convpipe-photos", "champion")
    assert str(champion.version) == "1"


def test_predict_and_export_work_on_it(journey) -> None:
    proc = journey.run("convpipe", "predict", "data/photos/poppy/poppy_04.jpg", "--format", "json")
    rows = json.loads(proc.stdout)
    assert rows[0]["predictions"][0]["class"] == "poppy"
    out = journey.run("convpipe", "export", "--format", "onnx").stdout
    assert "models/model.onnx: onnx export of models/model.ckpt" in out


def test_the_registered_model_serves_photos_as_prepare_saw_them(journey) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{journey.root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/convpipe-photos@champion")
    test_x = np.load(journey.root / "data/prepared/test_x.npy")
    test_y = np.load(journey.root / "data/prepared/test_y.npy")
    frame = served.predict(test_x)
    names = ["cornflower", "poppy"]
    assert (np.asarray(frame["class"]) == np.asarray(names)[test_y]).mean() >= 0.9

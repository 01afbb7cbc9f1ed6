"""The data stages through the real `dvc` CLI in a temporary git repo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.project import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("dvcproj"))
    proj.run("dvc", "repro", "augment")
    return proj


def test_repro_writes_prepared_augmented_and_preview(project):
    manifest = json.loads((project.root / "data/prepared/manifest.json").read_text())
    assert manifest["num_classes"] == 10
    assert manifest["channels"] == 1
    assert manifest["image_size"] == [8, 8]
    assert sum(s["count"] for s in manifest["splits"].values()) == 1797
    aug = json.loads((project.root / "data/augmented/manifest.json").read_text())
    assert list(aug["splits"]) == ["train"]
    assert aug["splits"]["train"]["count"] == manifest["splits"]["train"]["count"]
    x = np.load(project.root / "data/augmented/train_x.npy", mmap_mode="r")
    assert x.shape == (aug["splits"]["train"]["count"], 8, 8, 1)
    png = (project.root / "reports/augment_preview.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_second_repro_runs_nothing(project):
    out = project.run("dvc", "repro", "augment").stdout
    assert "Running stage" not in out
    assert "up to date" in out


def test_augment_param_reruns_only_augment(project):
    before = (project.root / "data/prepared/train_x.npy").stat().st_mtime_ns
    project.set_params(**{"augment.copies": 2})
    out = project.run("dvc", "repro", "augment").stdout
    assert "Running stage 'augment'" in out
    assert "Running stage 'prepare'" not in out
    assert (project.root / "data/prepared/train_x.npy").stat().st_mtime_ns == before
    aug = json.loads((project.root / "data/augmented/manifest.json").read_text())
    prep = json.loads((project.root / "data/prepared/manifest.json").read_text())
    assert aug["splits"]["train"]["count"] == 2 * prep["splits"]["train"]["count"]


def test_data_param_reruns_prepare(project):
    project.set_params(**{"data.test_fraction": 0.2})
    out = project.run("dvc", "repro", "augment").stdout
    assert "Running stage 'prepare'" in out
    assert "Running stage 'augment'" in out
    status = project.run("dvc", "status").stdout
    assert "changed" not in status

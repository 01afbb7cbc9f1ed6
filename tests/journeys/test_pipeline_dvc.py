"""The whole pipeline through the real `dvc` CLI in a temporary git repo, as `make run` does."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from tests.helpers.project import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("dvcproj"))
    proj.run("dvc", "repro")
    return proj


def _stages_run(output: str) -> set[str]:
    return {
        s
        for s in ("prepare", "augment", "train", "evaluate")
        if f"stage '{s}'" in output and f"Running stage '{s}'" in output
    }


def _runs(project) -> list[tuple[str, str]]:
    with sqlite3.connect(project.root / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, status FROM runs ORDER BY start_time").fetchall()


def test_repro_writes_every_stage_output(project):
    root = project.root
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["num_classes"] == 10 and manifest["channels"] == 1
    assert manifest["image_size"] == [8, 8]
    assert sum(s["count"] for s in manifest["splits"].values()) == 1797
    aug = json.loads((root / "data/augmented/manifest.json").read_text())
    assert list(aug["splits"]) == ["train"]
    assert aug["splits"]["train"]["count"] == manifest["splits"]["train"]["count"]
    x = np.load(root / "data/augmented/train_x.npy", mmap_mode="r")
    assert x.shape == (aug["splits"]["train"]["count"], 8, 8, 1)
    for png in (
        "augment_preview",
        "confusion_matrix",
        "misclassified",
        "curves",
        "reliability",
        "roc_pr",
        "gradcam",
    ):
        assert (root / "reports" / f"{png}.png").read_bytes().startswith(b"\x89PNG")
    assert (root / "models/model.ckpt").stat().st_size > 0
    calibration = json.loads((root / "models/calibration.json").read_text())
    assert calibration["method"] == "none" and calibration["temperature"] == 1.0
    history = (root / "plots/train/history.csv").read_text().splitlines()
    train_metrics = json.loads((root / "metrics/train.json").read_text())
    assert len(history) == train_metrics["epochs"] + 1


def test_shipped_params_reach_098_test_accuracy(project):
    metrics = json.loads((project.root / "metrics/eval.json").read_text())
    assert metrics["count"] == 269
    assert metrics["accuracy"] >= 0.98
    train_metrics = json.loads((project.root / "metrics/train.json").read_text())
    assert abs(train_metrics["test/acc"] - metrics["accuracy"]) < 1e-6


def test_one_finished_mlflow_run_with_eval_metrics(project):
    runs = _runs(project)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    run_id = json.loads((project.root / "models/mlflow_run.json").read_text())["run_id"]
    assert runs[0][0] == run_id
    with sqlite3.connect(project.root / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (run_id,))}
    assert {"train/loss", "val/loss", "val/acc", "test/accuracy", "test/f1_macro"} <= keys


def test_dvc_metrics_and_plots_work(project):
    shown = project.run("dvc", "metrics", "show", "--json").stdout
    assert "accuracy" in shown and "test/acc" in shown
    out = project.run("dvc", "plots", "show", "-o", "plots_html").stdout
    assert "index.html" in out
    html = (project.root / "plots_html" / "index.html").read_text()
    assert "confusion" in html.lower() or "predicted" in html
    for title in (  # evaluate's curves: one line per class (.dvc/plots/by_class.json)
        "Test ROC per class (one against the rest)",
        "Test precision-recall per class (one against the rest)",
        "Test reliability (calibration)",
    ):
        assert title in html, title
    assert '"field": "class"' in html  # coloured by class, not one zigzag line


def test_second_repro_runs_nothing(project):
    out = project.run("dvc", "repro").stdout
    assert _stages_run(out) == set()
    assert len(_runs(project)) == 1


def test_a_runtime_knob_reruns_nothing(project):
    project.set_params(**{"runtime.threads": 1, "runtime.channels_last": False})
    out = project.run("dvc", "repro").stdout
    assert _stages_run(out) == set()  # how it runs is not what it learnt
    project.run("git", "checkout", "params.yaml")


def test_exp_run_lr_reruns_only_train_and_evaluate(project):
    out = project.run("dvc", "exp", "run", "-S", "train.lr=0.002").stdout
    assert _stages_run(out) == {"train", "evaluate"}
    runs = _runs(project)
    assert len(runs) == 2 and all(status == "FINISHED" for _, status in runs)
    assert "train.lr" in project.run("dvc", "params", "diff").stdout


def test_augment_param_reruns_augment_not_prepare(project):
    project.set_params(**{"augment.copies": 2})
    out = project.run("dvc", "repro", "augment").stdout
    assert _stages_run(out) == {"augment"}
    aug = json.loads((project.root / "data/augmented/manifest.json").read_text())
    prep = json.loads((project.root / "data/prepared/manifest.json").read_text())
    assert aug["splits"]["train"]["count"] == 2 * prep["splits"]["train"]["count"]


def test_data_param_reruns_prepare(project):
    project.set_params(**{"data.test_fraction": 0.2})
    out = project.run("dvc", "repro", "augment").stdout
    assert _stages_run(out) == {"prepare", "augment"}

"""The docs' "Compare experiments" journey (docs/tracking.md), through the real dvc, git and MLflow.

The commands are read from the docs themselves (``documented_commands``): a baseline commit, two
``dvc exp run -S`` experiments and a queued one, then the comparison commands. The tests then
look at what a user looks at: ``dvc exp show``, ``metrics diff``, ``plots diff``, the MLflow
runs (and, in ``test_mlflow_ui_shows_every_experiment``, the MLflow UI in headless Chromium),
and a colleague's clone fed by a local-folder DVC remote.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.project import Project, documented_commands, make_project

pytestmark = pytest.mark.slow

EXPERIMENTS = {"lr-a": 0.002, "lr-b": 0.005, "lr-c": 0.001}
HEADLINE = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc_macro"]


@dataclass
class Journey:
    project: Project
    outputs: dict[str, str]  # command -> its stdout
    git_remote: Path


def _experiments(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` as {experiment name: its data}."""
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                found[rev.get("name") or exp.get("name")] = rev["data"]
    return found


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> Journey:
    project = make_project(tmp_path_factory.mktemp("compare") / "convpipe")
    project.set_params(**{"train.max_epochs": 4})  # the same journey, quicker
    remote = tmp_path_factory.mktemp("origin") / "convpipe.git"
    project.run("git", "init", "-q", "--bare", "-b", "main", str(remote))
    project.run("git", "commit", "-q", "-am", "4 epochs")
    project.run("git", "remote", "add", "origin", str(remote))
    outputs = {cmd: project.sh(cmd).stdout for cmd in documented_commands("compare")}
    return Journey(project, outputs, remote)


def test_every_experiment_has_its_metrics_in_exp_show(journey: Journey) -> None:
    shown = json.loads(journey.project.run("dvc", "exp", "show", "--json").stdout)
    baseline = shown[1]["data"]  # [0] is the workspace
    assert baseline["metrics"]["metrics/eval.json"]["data"]["accuracy"] > 0.9
    exps = _experiments(shown)
    assert set(exps) == set(EXPERIMENTS)
    for name, lr in EXPERIMENTS.items():
        data = exps[name]
        evaluated = data["metrics"]["metrics/eval.json"]["data"]
        trained = data["metrics"]["metrics/train.json"]["data"]
        assert list(evaluated)[: len(HEADLINE)] == HEADLINE
        assert "per_class" not in evaluated  # it is a plot, not 40 columns
        assert evaluated["accuracy"] == pytest.approx(trained["test/acc"], abs=1e-6)
        assert len(trained["mlflow_run_id"]) == 32
        # what the training cost, beside what it reached
        assert {"cost/train_seconds", "cost/images_per_s", "cost/train_tflops"} <= set(trained)
        assert trained["cost/precision"] in ("32-true", "bf16-mixed")
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
    # the queued one ran in a temporary copy and still came back with its results
    assert exps["lr-c"]["metrics"]["metrics/eval.json"]["data"]["count"] == 269


def test_readme_comparison_commands_show_what_differs(journey: Journey) -> None:
    out = journey.outputs
    shown = out["dvc exp show --only-changed"]
    for name in EXPERIMENTS:
        assert name in shown
    assert "train.lr" in shown and "accuracy" in shown
    assert "data.source" not in shown  # unchanged columns are left out
    diff = out["dvc metrics diff lr-a lr-b"]
    assert "metrics/eval.json" in diff and "accuracy" in diff and "mlflow_run_id" in diff
    params = out["dvc params diff lr-a lr-b"]
    lines = [line for line in params.splitlines() if line.startswith("params.yaml")]
    assert len(lines) == 1 and "train.lr" in lines[0] and "0.002" in lines[0]
    exp_diff = journey.project.run("dvc", "exp", "diff", "lr-a", "lr-b").stdout
    assert "accuracy" in exp_diff and "train.lr" in exp_diff
    html_line = out["dvc plots diff lr-a lr-b"].strip().splitlines()[-1]
    html = Path(html_line.removeprefix("file://")).read_text(encoding="utf-8")
    for plot in ("Accuracy per epoch", "Test confusion matrix", "Test F1 per class"):
        assert plot in html
    static = Path(html_line.removeprefix("file://")).parent / "static"
    pictures = sorted(p.name for p in static.iterdir())
    assert "lr-a_reports_curves.png" in pictures and "lr-b_reports_curves.png" in pictures


def test_an_experiment_changes_one_line_of_params_yaml(journey: Journey) -> None:
    refs = journey.project.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout
    (ref,) = [r for r in refs.split() if r.endswith("/lr-b")]  # an experiment is a git commit
    diff = journey.project.run("git", "diff", "main", ref, "--", "params.yaml").stdout
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in "+++---"]
    assert [line.split("#")[0].rstrip() for line in changed] == ["-  lr: 0.003", "+  lr: 0.005"]
    assert len({line.partition("#")[2] for line in changed}) == 1  # its comment kept as it was


def test_one_named_mlflow_run_per_experiment_with_its_datasets(journey: Journey) -> None:
    store = f"sqlite:///{journey.project.root / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("convpipe")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)) == 1 + len(EXPERIMENTS)  # baseline + experiments
    baseline = journey.project.run("git", "rev-parse", "main").stdout.strip()
    shown = _experiments(json.loads(journey.project.run("dvc", "exp", "show", "--json").stdout))
    for name, lr in EXPERIMENTS.items():
        found = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'"
        )
        assert len(found) == 1, name
        run = found[0]
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == str(lr)
        assert run.data.tags["dvc.exp_baseline_rev"] == baseline
        assert run.data.tags["git.commit"] == baseline
        assert "test/accuracy" in run.data.metrics
        # either side finds the other in one step
        assert shown[name]["metrics"]["metrics/train.json"]["data"]["mlflow_run_id"] == (
            run.info.run_id
        )
        contexts = {
            d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
            for d in run.inputs.dataset_inputs
        }
        assert contexts == {
            "digits-train": "train",
            "digits-val": "val",
            "digits-test": "test",
            "digits-train-augmented": "train",
        }
    with sqlite3.connect(journey.project.root / "mlflow.db") as db:
        datasets = db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0]
    assert datasets == 4  # same data in every run: the same four datasets, grouped


@pytest.mark.browser
def test_mlflow_ui_shows_every_experiment(journey: Journey, tmp_path: Path) -> None:
    from docs import screenshots

    if screenshots.browser_binaries() is None:
        if os.environ.get("CONVPIPE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (CONVPIPE_REQUIRE_BROWSER)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium-driver)")
    store = journey.project.root / "mlflow.db"
    exp = screenshots.experiment_id(store, "convpipe")
    with (
        screenshots.mlflow_server(store, tmp_path / "server.log") as url,
        screenshots.browser() as driver,
    ):
        text = screenshots.open_runs(driver, url, exp, list(EXPERIMENTS))
        assert "digits-train" in text  # the Dataset column
        screenshots.open_runs(driver, url, exp, list(EXPERIMENTS), chart=True)
        screenshots.show_chart(driver, "val/acc")
        body = driver.find_element("tag name", "body").text
        assert "val/acc" in body and "Step" in body
        assert "train/loss" not in body and "test/f1" not in body  # only the searched chart
        shot = tmp_path / "charts.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")


def test_a_colleague_pulls_everything_without_retraining(journey: Journey, tmp_path: Path) -> None:
    store = tmp_path / "dvc-store"
    subs = {"/srv/dvc-store": str(store), "GIT_REMOTE": str(journey.git_remote)}

    def local(cmd: str) -> str:
        for old, new in subs.items():
            cmd = cmd.replace(old, new)
        return cmd

    for cmd in documented_commands("share-push"):
        journey.project.sh(local(cmd))
    assert any(store.rglob("*"))  # data, models and pictures went to the remote
    colleague = Project(tmp_path / "elsewhere")
    colleague.root.mkdir()
    proc = colleague.sh(" && ".join(local(c) for c in documented_commands("share-pull")))
    clone = colleague.root / "convpipe"
    assert "Data and pipelines are up to date." in proc.stdout
    assert "Running stage" not in proc.stdout
    assert (clone / "models/model.ckpt").stat().st_size > 0
    shown = _experiments(
        json.loads(
            subprocess.run(
                ["dvc", "exp", "show", "--all-commits", "--json"],
                cwd=clone,
                env=colleague.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    )
    assert set(shown) == {"lr-b"}  # the pulled experiment, and only it
    assert shown["lr-b"]["metrics"]["metrics/eval.json"]["data"]["accuracy"] > 0.9
    assert not (clone / "mlflow.db").exists()  # nothing trained or evaluated there

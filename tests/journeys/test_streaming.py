"""data.format: litdata through the real `dvc` CLI: repro, push and pull, kills and resumes."""

from __future__ import annotations

import json
import shutil
import signal

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.helpers.interrupt import (
    assert_one_preemption_line,
    history,
    kill_after_epochs,
    run_status_and_tags,
    signal_mid_epoch,
)
from tests.helpers.project import documented_commands, journal, make_project

pytestmark = pytest.mark.slow

# as tests/training/test_resume.py, in the streaming format
LITDATA = {"data.format": "litdata", "train.max_epochs": 8, "train.patience": 3}


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """docs/scaling.md's commands (a `dvc exp run` into litdata), as a user runs them."""
    proj = make_project(tmp_path_factory.mktemp("litdata"))
    proj.set_params(**{k: v for k, v in LITDATA.items() if k != "data.format"})
    return proj, [proj.sh(cmd).stdout for cmd in documented_commands("streaming")]


@pytest.fixture(scope="module")
def project(journey):
    return journey[0]


@pytest.fixture(scope="module")
def reference(project):
    """The uninterrupted training's epochs."""
    return history(project.root)


def test_repro_streams_the_digits_and_evaluates_them(journey):
    project, outputs = journey
    root = project.root
    assert "chunk-0-0.bin" in outputs[-1] and "index.json" in outputs[-1]
    params = (root / "params.yaml").read_text()
    assert "format: litdata" in params  # the experiment's params, applied to the workspace
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["format"] == "litdata"
    for split in ("train", "val", "test"):
        assert (root / "data/prepared" / split / "index.json").exists()
        assert not (root / f"data/prepared/{split}_x.npy").exists()
    assert (root / "data/augmented/train/index.json").exists()
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    assert evaluated["count"] == 269 and evaluated["accuracy"] >= 0.97
    assert "up to date" in project.run("dvc", "status").stdout.lower()


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_chunks_are_pushed_and_pulled_like_any_output(project, reference, tmp_path):
    root = project.root
    project.run("dvc", "remote", "add", "--local", "-d", "store", str(tmp_path / "remote"))
    project.run("dvc", "push")
    before = _files(root / "data/prepared")
    for folder in ("data/prepared", "data/augmented", ".dvc/cache"):
        shutil.rmtree(root / folder)
    project.run("dvc", "pull")
    assert _files(root / "data/prepared") == before
    repro = project.run("dvc", "repro")
    assert "Running stage" not in repro.stdout  # pulled outputs are the cached ones


def test_prepare_gives_the_same_bytes_on_a_rerun(project, reference):
    """Deterministic chunks (one writer, an index keyed by content): DVC caches one version."""
    lock = (project.root / "dvc.lock").read_text()
    project.run("dvc", "repro", "--force", "prepare")
    assert (project.root / "dvc.lock").read_text() == lock


# LitData's StreamingDataLoader carries the position inside an epoch in Lightning's
# checkpoint; the same interruptions as the npy format's must resume as if never stopped.


def _same_history(project, reference) -> None:
    resumed = history(project.root)
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert abs(float(got["val/loss"]) - float(want["val/loss"])) < 1e-5


def test_killed_mid_epoch_it_resumes_as_if_never_stopped(tmp_path, reference):
    project = make_project(tmp_path / "kill")
    project.set_params(**LITDATA)
    project.run("dvc", "repro", "augment")
    kill_after_epochs(project, ["dvc", "repro", "train"], 2, mid_epoch=True)
    project.run("dvc", "repro", "train")
    _same_history(project, reference)
    assert [status for _, status in run_status_and_tags(project.root)[0]] == ["FINISHED"]


def test_sigterm_mid_epoch_resumes_from_the_loaders_own_state(tmp_path, reference):
    project = make_project(tmp_path / "term")
    project.set_params(**LITDATA)
    project.run("dvc", "repro", "augment")
    returncode, stderr = signal_mid_epoch(project, signal.SIGTERM)
    assert_one_preemption_line(project.root, returncode, stderr, signal.SIGTERM)
    ckpt = torch.load(project.root / "checkpoints/last.ckpt", weights_only=True)
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # LitData's position (per worker, per stream: prepared, augmented), saved by Lightning
    yielded = sum(sum(streams) for streams in loader["num_samples_yielded"].values())
    assert 0 < yielded < 2 * 1259
    project.run("dvc", "repro", "train")
    _same_history(project, reference)


def test_a_tuning_campaign_streams_its_trials(project, reference):
    """`convpipe tune` on litdata: every trial streams the chunks (there are no npy arrays)."""
    params = project.params_copy(
        "lit-tune",
        **{
            "tune.n_trials": 2,
            "tune.max_epochs": 2,
            "tune.sampler": "random",
            "tune.pruner": "none",
            "tune.storage": "journal:lit-tune.journal",
            "tune.study_name": "lit-tune",
            "paths.tuning_reports": "reports/lit-tune",
            "mlflow.experiment": "lit-tune",
            "tune.space": {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        },
    )
    project.run("convpipe", "--params", params, "tune")
    storage = journal(project.root / "lit-tune.journal")
    trials = optuna.load_study(study_name="lit-tune", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        losses = list(trial.intermediate_values.values())
        assert len(losses) == 2 and losses[-1] < 1.0, losses  # it learnt: chance is ln 10 = 2.3
    assert trials[0].params != trials[1].params and trials[0].value != trials[1].value
    assert "up to date" in project.run("dvc", "status").stdout.lower()  # tuning changed no stage

"""The fine-tuning journey of docs/finetune.md, real CLIs: train, register, fine-tune anew.

``make run`` registers the digits model as ``convpipe-cnn@champion``; the page's commands then
fine-tune it on a folder of two other classes, from the registry and from a checkpoint file,
and a code-carrying file is refused in one line.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from mlflow import MlflowClient

from tests.helpers import datagen
from tests.helpers.project import Project, documented_commands, make_project

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> tuple[Project, list[str]]:
    """A project after the documented fine-tuning commands, and each command's stderr."""
    project = make_project(tmp_path_factory.mktemp("finetune"))
    # the docs' "a folder of your photos": two classes the digits model never had
    datagen.write_imagefolder(
        project.root / "data/twodigits", n_per_class=60, classes=("three", "eight"), size=8
    )
    logs = []
    for command in documented_commands("finetune"):
        proc = project.sh(command)
        logs.append(proc.stdout + proc.stderr)
    return project, logs


def _client(project: Project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")


def test_the_registered_champion_seeds_a_model_of_new_classes(journey) -> None:
    project, logs = journey
    text = "\n".join(logs)
    # 16 tensors: two conv blocks (conv weight + 5 BN tensors each), the hidden and output layers
    assert (
        "model.init_from: took 14 of 16 tensors from models:/convpipe-cnn@champion; "
        "new: classifier.out (other classes: 10 there, 2 here)"
    ) in text, text
    init = json.loads((project.root / "models/init_source.json").read_text())
    assert init["registered_model"] == "convpipe-cnn" and init["version"] == "1"
    client = _client(project)
    source = client.get_model_version("convpipe-cnn", "1")
    runs = client.search_runs(
        [source_run.info.experiment_id for source_run in [client.get_run(source.run_id)]],
        filter_string="tags.`convpipe.init_from` = 'models:/convpipe-cnn@champion'",
    )
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["convpipe.init_from.run_id"] == source.run_id
    experiment = client.get_run(source.run_id).info.experiment_id
    assert f"(#/experiments/{experiment}/runs/{source.run_id})" in tags["mlflow.note.content"]
    assert runs[0].data.params["train.freeze_epochs"] == "2"
    # the fine-tuned model is registered under its own name; the digits champion is untouched
    assert str(client.get_model_version_by_alias("twodigits-cnn", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("convpipe-cnn", "champion").version) == "1"
    metrics = json.loads((project.root / "metrics/eval.json").read_text())
    assert metrics["count"] == 18 and metrics["accuracy"] >= 0.9


def test_a_checkpoint_file_seeds_it_too_and_is_a_dependency(journey) -> None:
    project, _ = journey
    shutil.copyfile(project.root / "models/model.ckpt", project.root / "pretrained.ckpt")
    project.set_params(**{"model.init_from": "pretrained.ckpt"})
    proc = project.run("dvc", "repro")
    assert "took 16 of 16 tensors from pretrained.ckpt (every layer)" in proc.stderr
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "fine-tuned from pretrained.ckpt")
    assert project.run("dvc", "status").stdout.strip().endswith("up to date.")
    # another file under the same name: `dvc repro -f -s init` looks again, train reruns
    checkpoint = torch.load(project.root / "pretrained.ckpt", weights_only=True)
    checkpoint["state_dict"]["net.classifier.out.bias"] += 1.0
    torch.save(checkpoint, project.root / "pretrained.ckpt")
    project.run("dvc", "repro", "-f", "-s", "init")
    status = project.run("dvc", "status").stdout
    assert re.search(
        r"^train:\n\s+changed deps:\n\s+modified:\s+models/init_source.json", status, re.M
    ), status


def test_a_code_carrying_init_is_refused_in_one_line(journey, tmp_path) -> None:
    project, _ = journey
    marker = tmp_path / "owned"
    evil = project.root / "evil.ckpt"
    torch.save({"state_dict": _Owned(str(marker))}, evil)
    proc = project.run("dvc", "exp", "run", "-S", "model.init_from=evil.ckpt", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("convpipe: error:")]
    assert errors == [
        "convpipe: error: cannot load model.init_from: it would run code (posix.system) instead "
        "of only loading weights, at evil.ckpt, set model.init_from to a convpipe checkpoint or "
        "weights file of this network"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


class _Owned:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, (f"touch {self.path}",))

"""The evaluation package: metrics against hand-computed values, plots, safe checkpoint loading."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional import classification as tmf

from convpipe.config.schema import ModelParams, Params, TrainParams, parse_params
from convpipe.data.datasets import ArrayDataset
from convpipe.data.transforms.normalize import BatchTransform
from convpipe.errors import ConvpipeError
from convpipe.evaluation.evaluate import evaluate, read_history
from convpipe.evaluation.metrics import (
    CALIBRATION_BINS,
    CURVE_POINTS,
    calibration_csv,
    class_curves,
    compute_metrics,
    confusion_csv,
    expected_calibration_error,
    headline,
    mlflow_metrics,
    per_class_csv,
    reliability,
    rows_csv,
    worst_mistakes,
)
from convpipe.evaluation.metrics import (
    test_loss as mean_test_loss,
)
from convpipe.evaluation.plots import (
    plot_class_curves,
    plot_confusion,
    plot_curves,
    plot_misclassified,
    plot_reliability,
    save_figure,
)
from convpipe.inference.predict import predict_logits
from convpipe.models.checkpoint import load_model
from convpipe.models.module import CNNClassifier
from convpipe.tracking.provenance import RunInfo
from convpipe.tracking.store import ENV_URI
from tests.helpers.models import TINY_CONV, fit_and_save, model_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- metrics

# K = 3: preds [0, 1, 1, 2, 2, 2] for labels [0, 0, 1, 1, 2, 2]
PROBS_3 = torch.tensor(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.3, 0.6],
        [0.2, 0.2, 0.6],
        [0.1, 0.1, 0.8],
    ]
)
LABELS_3 = torch.tensor([0, 0, 1, 1, 2, 2])


def test_compute_metrics_three_classes_by_hand() -> None:
    out = compute_metrics(PROBS_3, LABELS_3, ["a", "b", "c"], top_k=2)
    # class a: TP 1, FP 0, FN 1 | class b: TP 1, FP 1, FN 1 | class c: TP 2, FP 1, FN 0
    precision, recall = [1.0, 0.5, 2 / 3], [0.5, 0.5, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert out["count"] == 6
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision_macro"] == pytest.approx(sum(precision) / 3)
    assert out["recall_macro"] == pytest.approx(sum(recall) / 3)
    assert out["f1_macro"] == pytest.approx(sum(f1) / 3)
    # one-vs-rest AUROC, counting positive/negative pairs ranked right (ties count 1/2):
    # a: 8/8, b: 7/8, c: 7.5/8
    assert out["auroc_macro"] == pytest.approx((1 + 7 / 8 + 7.5 / 8) / 3)
    assert not any(key.startswith("top") for key in out)  # K <= 5: no top-k accuracy
    assert list(out["per_class"]) == ["a", "b", "c"]
    for i, name in enumerate("abc"):
        row = out["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == 2


def test_eval_json_holds_the_headline_and_the_per_class_rows_go_to_a_plot() -> None:
    out = compute_metrics(PROBS_3, LABELS_3, ["a", "b", "c"], top_k=2)
    head = headline(out)
    assert next(iter(head)) == "accuracy" and "per_class" not in head
    assert set(head) == set(out) - {"per_class"}
    lines = per_class_csv(out["per_class"]).splitlines()
    assert lines[0] == "class,precision,recall,f1,support"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ["a", "b", "c"]
    for row in rows:
        values = out["per_class"][row[0]]
        assert [float(v) for v in row[1:4]] == [values[k] for k in ("precision", "recall", "f1")]
        assert int(row[4]) == values["support"]


# K = 6: the true class ranks 1, 2, 3, 1, 2, 6 in its row
PROBS_6 = torch.tensor(
    [
        [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
        [0.40, 0.30, 0.10, 0.10, 0.06, 0.04],
        [0.40, 0.30, 0.20, 0.05, 0.03, 0.02],
        [0.10, 0.10, 0.10, 0.50, 0.10, 0.10],
        [0.40, 0.10, 0.06, 0.04, 0.30, 0.10],
        [0.30, 0.20, 0.18, 0.15, 0.12, 0.05],
    ]
)
LABELS_6 = torch.arange(6)


@pytest.mark.parametrize(
    ("top_k", "key", "expected"),
    [(2, "top2_accuracy", 4 / 6), (3, "top3_accuracy", 5 / 6), (10, "top6_accuracy", 1.0)],
)
def test_top_k_only_above_five_classes(top_k: int, key: str, expected: float) -> None:
    out = compute_metrics(PROBS_6, LABELS_6, list("uvwxyz"), top_k=top_k)
    assert out["accuracy"] == pytest.approx(2 / 6)
    assert [k for k in out if k.startswith("top")] == [key]
    assert out[key] == pytest.approx(expected)
    assert [row["support"] for row in out["per_class"].values()] == [1] * 6


def test_no_top_k_at_five_classes() -> None:
    out = compute_metrics(torch.eye(5), torch.arange(5), list("abcde"), top_k=3)
    assert out["accuracy"] == 1.0 and out["auroc_macro"] == 1.0
    assert not any(key.startswith("top") for key in out)


def test_binary_metrics_use_the_binary_auroc() -> None:
    p1 = torch.tensor([0.1, 0.6, 0.4, 0.9])
    probs = torch.stack([1 - p1, p1], dim=1)
    out = compute_metrics(probs, torch.tensor([0, 0, 1, 1]), ["neg", "pos"], top_k=3)
    assert out["accuracy"] == pytest.approx(0.5)
    # positives 0.4, 0.9 against negatives 0.1, 0.6: 3 of 4 pairs ranked right
    assert out["auroc_macro"] == pytest.approx(0.75)
    assert out["per_class"]["pos"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert not any(key.startswith("top") for key in out)


def _confident(confidence: float, right: int, n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 3-class predictions of class 0 at ``confidence``, ``right`` of them correct."""
    rest = (1 - confidence) / 2
    probs = torch.tensor([[confidence, rest, rest]]).repeat(n, 1)
    labels = torch.tensor([0] * right + [1] * (n - right))
    return probs, labels


def test_calibration_error_is_the_gap_between_confidence_and_accuracy() -> None:
    calibrated = _confident(0.8, 80)
    assert expected_calibration_error(*calibrated) == pytest.approx(0.0, abs=1e-6)
    overconfident = _confident(0.9, 70)  # says 0.9, is right 0.7 of the time
    assert expected_calibration_error(*overconfident) == pytest.approx(0.2, abs=1e-6)
    mixed = (
        torch.cat([calibrated[0], overconfident[0]]),
        torch.cat([calibrated[1], overconfident[1]]),
    )
    assert expected_calibration_error(*mixed) == pytest.approx(0.1, abs=1e-6)  # by count
    bins = reliability(*mixed)  # the diagram's bins: one per confidence level here
    assert [(round(b["confidence"], 6), round(b["accuracy"], 6), b["count"]) for b in bins] == [
        (0.8, 0.8, 100),
        (0.9, 0.7, 100),
    ]
    assert (
        sum(b["count"] for b in reliability(torch.rand(64, 3).softmax(1), torch.zeros(64).long()))
        == 64
    )
    assert len(bins) <= CALIBRATION_BINS
    text = calibration_csv(bins)
    assert text.splitlines()[0] == "confidence,accuracy,ideal,count"
    assert plot_reliability(bins, 0.1).axes[0].get_title() == "Reliability (ECE 0.1000)"
    scaled = plot_reliability(bins, 0.02, 0.4812).axes[0].get_title()
    assert scaled == "Reliability (ECE 0.0200, logits / 0.4812)"


def test_class_curves_are_one_against_the_rest_for_every_class() -> None:
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(30)
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.2 / 3
    with _deterministic():  # as after a training: must not change the answer, nor blow up
        roc, pr = class_curves(perfect, labels, ["a", "b", "c"])
    assert sorted({row["class"] for row in roc}) == ["a", "b", "c"]
    for name in "abc":
        mine = [(r["fpr"], r["tpr"]) for r in roc if r["class"] == name]
        assert (0.0, 1.0) in mine  # a perfect ranking: the corner
        assert [r[0] for r in mine] == sorted(r[0] for r in mine)  # left to right
        assert max(r["precision"] for r in pr if r["class"] == name and r["recall"] == 1.0) == 1.0
    noisy = torch.rand(90, 3).softmax(1)
    roc, _ = class_curves(noisy, labels, ["a", "b", "c"])
    fpr = [r["fpr"] for r in roc if r["class"] == "a"]
    tpr = [r["tpr"] for r in roc if r["class"] == "a"]
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    exact = float(tmf.binary_auroc(noisy[:, 0], (labels == 0).long()))
    assert area == pytest.approx(exact, abs=1e-4)  # every threshold: the exact area
    many = torch.rand(5000, 3).softmax(1)
    thinned, _ = class_curves(many, torch.arange(3).repeat(5000 // 3 + 1)[:5000], "abc")
    assert max(sum(r["class"] == c for r in thinned) for c in "abc") <= CURVE_POINTS
    assert rows_csv(roc).splitlines()[0] == "class,fpr,tpr"
    fig = plot_class_curves(roc, _, 0.5)
    assert "macro AUROC 0.5000" in fig.axes[0].get_title()


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_test_loss_by_hand() -> None:
    # a zero logit: BCE = log 2; three equal logits: CE = log 3
    assert mean_test_loss(torch.zeros(4), torch.tensor([0, 1, 1, 0])) == pytest.approx(math.log(2))
    assert mean_test_loss(torch.zeros(2, 3), torch.tensor([0, 2])) == pytest.approx(math.log(3))
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert mean_test_loss(logits, torch.tensor([0])) == pytest.approx(expected)


def test_mlflow_metrics_flattens_per_class_with_safe_names() -> None:
    metrics = compute_metrics(PROBS_3, LABELS_3, ["a", "b/c", "ü ber"], top_k=3)
    metrics["loss"] = 0.25
    flat = mlflow_metrics(metrics)
    assert flat["test/accuracy"] == pytest.approx(4 / 6)
    assert flat["test/loss"] == 0.25 and flat["test/count"] == 6.0
    assert flat["test/support/b_c"] == 2.0
    assert "test/f1/_ ber" in flat
    assert not any("per_class" in key for key in flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_confusion_csv_rows() -> None:
    text = confusion_csv(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), ["cat", "dog", "e"])
    assert text == "actual,predicted\ncat,cat\ndog,e\ndog,dog\n"


def test_worst_mistakes_most_confident_first_ties_in_order() -> None:
    probs = torch.tensor([[0.25, 0.75], [0.3, 0.7], [0.125, 0.875], [0.75, 0.25], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 1, 0])
    assert worst_mistakes(probs, labels, 10).tolist() == [2, 0, 3]
    assert worst_mistakes(probs, labels, 2).tolist() == [2, 0]
    assert worst_mistakes(probs, probs.argmax(dim=1), 5).tolist() == []


# --------------------------------------------------------------------------- pictures


def test_plot_confusion_writes_counts() -> None:
    matrix = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 7]])
    fig = plot_confusion(matrix, ["a", "b", "c"])
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(v) for v in matrix.flatten()]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c"]


def test_plot_misclassified_titles_and_empty_case() -> None:
    images = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    fig = plot_misclassified(images, [0, 1, 2], [1, 2, 0], [0.9, 0.8, 0.7], ["a", "b", "c"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["a → b\n(0.90)", "b → c\n(0.80)", "c → a\n(0.70)"]
    empty = plot_misclassified(np.zeros((0, 8, 8, 1), np.uint8), [], [], [], ["a", "b"])
    assert "no mistakes" in empty.axes[0].texts[0].get_text()


def test_plot_curves_draws_train_and_val() -> None:
    rows = [
        {"epoch": "0", "train/loss": "1.0", "val/loss": "0.9", "train/acc": "0.5", "val/acc": ""},
        {
            "epoch": "1",
            "train/loss": "0.5",
            "val/loss": "0.6",
            "train/acc": "0.8",
            "val/acc": "0.7",
        },
    ]
    fig = plot_curves(rows)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train", "val"]
    assert list(loss_ax.lines[0].get_ydata()) == [1.0, 0.5]
    val_acc = acc_ax.lines[1].get_ydata()
    assert math.isnan(val_acc[0]) and val_acc[1] == 0.7  # a missing value is a gap


def test_save_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "confusion.png"
    save_figure(plot_confusion(np.eye(2, dtype=int), ["a", "b"]), target)
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert os.listdir(target.parent) == ["confusion.png"]
    # a figure that fails to render leaves the previous file whole and no temp file behind
    before = target.read_bytes()
    broken = Figure()
    broken.subplots().set_title(r"$\frac{$")  # invalid mathtext: raises while drawing
    with pytest.raises(ValueError):
        save_figure(broken, target)
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["confusion.png"]


# --------------------------------------------------------------------------- checkpoints


SMALL_MODEL = model_section(TINY_CONV, [8], 0.0)


@pytest.fixture(scope="module")
def checkpoint(raw_params, tmp_path_factory) -> tuple[Path, CNNClassifier]:
    """A real Lightning checkpoint of a 3-class CNN after one optimiser step."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    train = TrainParams.model_validate({**raw_params["train"], "max_epochs": 1})
    model = CNNClassifier(
        ModelParams.model_validate(SMALL_MODEL), train, 1, (8, 8), 3, 12, ["a", "b", "c"]
    )
    data = TensorDataset(torch.randn(12, 1, 8, 8), torch.arange(12) % 3)
    path = root / "model.ckpt"
    fit_and_save(model, DataLoader(data, batch_size=12), root, path, max_steps=1)
    return path, model


def test_load_model_round_trip(checkpoint) -> None:
    path, trained = checkpoint
    model = load_model(path)
    assert isinstance(model, CNNClassifier) and not model.training
    assert model.hparams["class_names"] == ["a", "b", "c"] and model.num_classes == 3
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_predict_logits_batches_in_order(checkpoint) -> None:
    model = load_model(checkpoint[0])
    x = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
    transform = BatchTransform(None, [0.3], [0.2])
    dataset = ArrayDataset(x, np.zeros(7, dtype=np.int64), transform)
    logits = predict_logits(model, dataset, 3, "none")
    with torch.no_grad():
        expected = model(transform(x))
    assert logits.shape == (7, 3)
    torch.testing.assert_close(logits, expected)


def test_load_model_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConvpipeError, match="checkpoint not found"):
        load_model(tmp_path / "absent.ckpt")


def test_load_model_truncated_file(checkpoint, tmp_path: Path) -> None:
    data = checkpoint[0].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvpipeError) as info:
        load_model(truncated)
    assert info.value.line().startswith("convpipe: error: cannot load checkpoint")
    assert "truncated.ckpt" in info.value.line() and "\n" not in info.value.line()


def test_load_model_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ConvpipeError, match="cannot load checkpoint"):
        load_model(path)


class MakesAFile:
    """A pickle payload that creates a file when unpickled (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_load_model_never_runs_code_from_the_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": MakesAFile(marker)}, evil)
    with pytest.raises(ConvpipeError, match="cannot load checkpoint"):
        load_model(evil)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    proof = tmp_path / "proof"
    torch.save({"x": MakesAFile(proof)}, tmp_path / "proof.ckpt")
    torch.load(tmp_path / "proof.ckpt", weights_only=False)
    assert proof.exists()


MARKER_ENV = "CONVPIPE_TEST_MARKER"


def leave_marker(cls: Any, kwargs: dict[str, Any]) -> Any:
    """An ``_instantiator`` a hostile checkpoint names: proof that code from it ran."""
    Path(os.environ[MARKER_ENV]).write_text("ran", encoding="utf-8")
    return cls(**kwargs)


def _crafted(source: Path, dest: Path, **hparams: Any) -> Path:
    """``source`` with its hyperparameters changed: what an attacker would hand over."""
    data = torch.load(source, map_location="cpu", weights_only=True)
    data["hyper_parameters"] = {**data["hyper_parameters"], **hparams}
    torch.save(data, dest)
    return dest


def test_a_checkpoint_with_an_instantiator_is_refused_before_lightning(
    checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.core import saving

    marker = tmp_path / "pwned"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    # Lightning < 2.6.6 called any _instantiator; open 2.6.6's allowlist to be that version
    path = f"{__name__}.leave_marker"
    monkeypatch.setattr(saving, "_ALLOWED_INSTANTIATORS", {*saving._ALLOWED_INSTANTIATORS, path})
    evil = _crafted(checkpoint[0], tmp_path / "evil.ckpt", _instantiator=path)
    with pytest.raises(ConvpipeError) as info:
        load_model(evil)
    line = info.value.line()
    assert "hold keys convpipe never writes (_instantiator)" in line and "\n" not in line
    assert not marker.exists()
    # the payload is live: Lightning's own loader, on such a version, runs it
    CNNClassifier.load_from_checkpoint(evil, map_location="cpu", weights_only=True)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_path": "os.system"}, "never writes (_class_path)"),
        ({"num_classes": torch.tensor(3)}, "not plain data: hyper_parameters.num_classes (Tensor)"),
        ({"model": {"conv": [{"filters": torch.tensor(4)}]}}, "model.conv[0].filters (Tensor)"),
        ({"num_classes": 4, "class_names": list("abcd")}, "its weights do not fit its network"),
        ({"train_size": -1}, "its hyperparameters are invalid: train_size"),
    ],
)
def test_hyperparameters_convpipe_did_not_write_are_refused(
    checkpoint, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    evil = _crafted(checkpoint[0], tmp_path / "odd.ckpt", **change)
    with pytest.raises(ConvpipeError) as info:
        load_model(evil)
    assert message in info.value.line()


def test_a_checkpoint_without_hyperparameters_is_refused(checkpoint, tmp_path: Path) -> None:
    data = torch.load(checkpoint[0], map_location="cpu", weights_only=True)
    del data["hyper_parameters"]["class_names"]
    torch.save(data, tmp_path / "missing.ckpt")
    with pytest.raises(ConvpipeError, match="lack class_names"):
        load_model(tmp_path / "missing.ckpt")
    del data["hyper_parameters"]
    torch.save(data, tmp_path / "none.ckpt")
    with pytest.raises(ConvpipeError, match="it has no hyperparameters"):
        load_model(tmp_path / "none.ckpt")


# --------------------------------------------------------------------------- evaluate()


def _params(raw: dict[str, Any], root: Path) -> Params:
    raw = copy.deepcopy(raw)
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return parse_params(raw)


def test_evaluate_without_a_training_run_fails_before_writing(
    raw_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_URI, raising=False)
    params = _params(raw_params, tmp_path)
    with pytest.raises(ConvpipeError, match="no MLflow run recorded"):
        evaluate(params)
    # a record of a run the tracking store does not know
    RunInfo("0" * 32, "1", "sqlite:///elsewhere.db").save(params.paths.run_info)
    with pytest.raises(ConvpipeError) as info:
        evaluate(params)
    assert f"run {'0' * 32} of the training not found" in info.value.line()
    assert "sqlite:///elsewhere.db" in info.value.line()
    assert not Path(params.paths.eval_metrics).exists()
    assert not Path(params.paths.confusion_png).exists()


def test_read_history_missing(tmp_path: Path) -> None:
    with pytest.raises(ConvpipeError, match="training history not found"):
        read_history(tmp_path / "history.csv")


@pytest.mark.subprocess
def test_huge_layers_in_a_checkpoint_are_refused_before_any_allocation(
    checkpoint, tmp_path: Path
) -> None:
    data = torch.load(checkpoint[0], map_location="cpu", weights_only=True)
    model = {**data["hyper_parameters"]["model"], "hidden": [2**20, 2**20]}  # ~1 T parameters
    evil = _crafted(checkpoint[0], tmp_path / "huge.ckpt", model=model)
    # under a 4 GiB address-space limit any attempt to build the layers fails at once
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "from convpipe.errors import ConvpipeError\n"
        "from convpipe.models.checkpoint import load_model\n"
        "try:\n"
        "    load_model(sys.argv[1])\n"
        "except ConvpipeError as exc:\n"
        "    print(exc.line())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(evil)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "the network would have 1,099," in line and "model.hidden[1]" in line, line
    assert "more than half of this machine's" in line


def test_check_size_follows_the_memory() -> None:
    from convpipe.models.network import check_size
    from convpipe.models.shapes import LayerShape

    rows = [LayerShape("model.hidden[0]", "linear", (10,), 1_000_000, 0)]
    check_size(rows, memory=8_000_001)  # 4 MB of weights: under half of 8 MB
    with pytest.raises(ConvpipeError, match="1,000,000 parameters"):
        check_size(rows, memory=7_999_999)

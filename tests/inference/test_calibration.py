"""inference/calibration.py: fitting the temperature, storing it, and every loader applying it."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.evaluation.evaluate import calibrate
from convpipe.inference.calibration import (
    Calibration,
    checkpoint_digest,
    fit_temperature,
    nll,
    read_calibration,
    write_calibration,
)
from convpipe.inference.predict import predict_logits, prepared_split
from convpipe.inference.trained import load_trained
from convpipe.models.checkpoint import load_model
from tests.helpers.factories import params_in, prepared, tiny_checkpoint
from tests.helpers.models import TINY_CONV, model_section


def _overconfident(
    scale: float, n: int = 4000, k: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from ``softmax(z)``, and ``scale * z`` as the logits: ``T = scale`` is right."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=gen)[:, 0]
    return z * scale, labels


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_the_fitted_temperature_undoes_a_known_scaling(scale: float) -> None:
    logits, labels = _overconfident(scale)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(scale, rel=0.1)
    assert nll(logits, labels, temperature) < nll(logits, labels)
    # the same logits give the same temperature: what is stored is what is applied
    assert fit_temperature(logits, labels) == temperature


def test_two_classes_fit_on_the_single_logit() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3000, generator=gen) * 2
    labels = (torch.rand(3000, generator=gen) < torch.sigmoid(z)).long()
    assert fit_temperature(z * 4, labels) == pytest.approx(4, rel=0.1)


def test_a_split_without_a_mistake_has_no_temperature_to_fit() -> None:
    # every image right: the NLL keeps falling as T -> 0, so any T fitted would be the bound
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0]] * 30)
    labels = torch.tensor([0, 1, 2] * 30)
    assert fit_temperature(logits, labels) is None
    binary = torch.tensor([-4.0, 3.0, -5.0] * 30)
    assert fit_temperature(binary, (labels == 1).long()) is None
    # one mistake bounds it from below: a temperature inside the search again
    logits[0] = torch.tensor([0.0, 2.0, 0.0])
    fitted = fit_temperature(logits, labels)
    assert fitted is not None and 1 / 20 < fitted < 1


def test_an_empty_val_split_is_one_line() -> None:
    with pytest.raises(ConvpipeError) as info:
        fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert "val split is empty" in info.value.line()
    assert "evaluate.calibration: none" in info.value.line()


@pytest.fixture()
def project(raw_params, tmp_path: Path) -> Params:
    """Digits prepared and a checkpoint trained a few steps on them."""
    _, params = params_in(raw_params, tmp_path, model=model_section(TINY_CONV, [16], 0.0))
    tiny_checkpoint(params, prepared(params), tmp_path, steps=3, images="train", count=64)
    return params


def _val_logits(params: Params, temperature: float | None) -> torch.Tensor:
    calibration = params.paths.calibration if temperature is not None else None
    model, _ = load_trained(params.paths.model, params.paths.prepared, calibration=calibration)
    if temperature is not None:
        assert model.temperature == temperature
    val = prepared_split(params.paths.prepared, "val", params.base.seed)
    return predict_logits(model, val, 256, "none")


def test_evaluate_fits_on_val_and_every_loader_divides_by_it(project: Params) -> None:
    params = project.model_copy(
        update={"evaluate": project.evaluate.model_copy(update={"calibration": "temperature"})}
    )
    raw = _val_logits(params, None)
    model = load_model(params.paths.model)
    written = calibrate(params, model)
    stored = json.loads(Path(params.paths.calibration).read_text())
    assert stored == dataclasses.asdict(written)
    val = prepared_split(params.paths.prepared, "val", params.base.seed)
    assert stored["method"] == "temperature" and stored["fitted_on"] == "val"
    assert stored["images"] == len(val) and stored["tta"] == "none"
    assert stored["checkpoint_sha256"] == checkpoint_digest(params.paths.model)
    assert stored["nll_after"] <= stored["nll_before"]
    temperature = stored["temperature"]
    assert temperature != 1.0 and model.temperature == temperature  # the val split has mistakes
    # predict, export and feature maps load through load_trained: the logits come divided
    calibrated = _val_logits(params, temperature)
    torch.testing.assert_close(calibrated, raw / temperature)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))  # the same predictions
    # training never sees it: the network's own logits in train mode
    model.train()
    x = torch.randn(2, *model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))


def test_calibration_none_writes_one_for_this_checkpoint(project: Params) -> None:
    model = load_model(project.paths.model)
    assert calibrate(project, model).temperature == 1.0
    stored = json.loads(Path(project.paths.calibration).read_text())
    assert stored["method"] == "none" and stored["temperature"] == 1.0
    assert stored["checkpoint_sha256"] == checkpoint_digest(project.paths.model)


def test_a_temperature_for_other_weights_is_not_applied_and_said(
    project: Params, caplog: pytest.LogCaptureFixture
) -> None:
    path = project.paths.calibration
    write_calibration(path, Calibration("temperature", 2.0, "0" * 64, "val", 10))
    with caplog.at_level(logging.WARNING, logger="convpipe"):
        assert read_calibration(path, project.paths.model) == 1.0
    assert "fitted for other weights" in caplog.text and "dvc repro evaluate" in caplog.text
    digest = checkpoint_digest(project.paths.model)
    write_calibration(path, Calibration("temperature", 2.0, digest, "val", 10))
    assert read_calibration(path, project.paths.model) == 2.0
    assert read_calibration(Path(path).with_name("absent.json"), project.paths.model) == 1.0
    assert read_calibration(None, project.paths.model) == 1.0


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("{not json", "cannot be read"),
        ('{"method": "temperature"}', "cannot be read (KeyError"),
        ('{"temperature": -1, "checkpoint_sha256": "x"}', "must be a positive number, got -1"),
        ('{"temperature": NaN, "checkpoint_sha256": "x"}', "must be a positive number, got nan"),
    ],
    ids=["damaged", "no-temperature", "negative", "nan"],
)
def test_a_damaged_calibration_file_is_one_line(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(ConvpipeError) as info:
        read_calibration(path, tmp_path / "model.ckpt")
    line = info.value.line()
    assert said in line and str(path) in line and "dvc repro evaluate" in line

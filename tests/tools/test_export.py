"""export.py and `convpipe export`: pt2, ONNX and TorchScript files reproducing the checkpoint."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from convpipe.cli import build_parser
from convpipe.config.schema import Params
from convpipe.data.datasets import ArrayDataset
from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.transforms.normalize import BatchTransform
from convpipe.errors import ConvpipeError
from convpipe.inference.calibration import Calibration, checkpoint_digest, write_calibration
from convpipe.inference.predict import predict_logits
from convpipe.models.checkpoint import load_model
from convpipe.models.network import probabilities
from convpipe.tools import export as ex
from tests.helpers import datagen
from tests.helpers.cli import run_cli
from tests.helpers.factories import params_in, prepared, tiny_checkpoint
from tests.helpers.models import TINY_CONV, TINY_RESIDUAL, model_section

# --------------------------------------------------------------------------- fixtures


def _setup(
    raw_params: dict[str, Any],
    root: Path,
    data: dict[str, Any],
    model: dict[str, Any] | None = None,
) -> tuple[Path, Params]:
    """Prepared data and a one-step checkpoint of ``model``, everything under ``root``.

    The default network has dropout and batch norm, which make train-mode outputs differ from
    eval-mode ones: parity then also proves the export is of the eval-mode network.
    """
    network = model or model_section(TINY_CONV, [8], 0.5)
    params_path, params = params_in(raw_params, root, model=network, data=data)
    tiny_checkpoint(params, prepared(params), root)
    return params_path, params


@pytest.fixture(scope="module")
def digits(raw_params, tmp_path_factory) -> tuple[Path, Params]:
    """10-class 8x8 grey digits and a checkpoint for them."""
    return _setup(raw_params, tmp_path_factory.mktemp("digits"), {})


@pytest.fixture(scope="module")
def binary(raw_params, tmp_path_factory) -> tuple[Path, Params]:
    """2-class 16x16 RGB images (cat/dog folders) and a checkpoint with one output logit."""
    root = tmp_path_factory.mktemp("binary")
    images = datagen.write_imagefolder(
        root / "images", n_per_class=20, classes=("cat", "dog"), color=True
    )
    return _setup(raw_params, root, {"source": "imagefolder", "path": str(images)})


def _reference(params: Params) -> tuple[torch.Tensor, ArrayDataset]:
    """The checkpoint's logits on the prepared test split, read without export.py's help."""
    manifest = load_manifest(params.paths.prepared)
    x, y = load_split(params.paths.prepared, manifest, "test")
    dataset = ArrayDataset(x, y, BatchTransform(None, manifest.mean, manifest.std))
    return predict_logits(load_model(params.paths.model), dataset, 512, "none"), dataset


@pytest.fixture(scope="module")
def residual(raw_params, tmp_path_factory) -> tuple[Path, Params]:
    """The digits and a residual network (stages, projection shortcut, global pooling)."""
    return _setup(raw_params, tmp_path_factory.mktemp("residual"), {}, TINY_RESIDUAL)


@pytest.fixture(scope="module")
def exported(digits, binary, residual, tmp_path_factory) -> dict[tuple[str, str], ex.ExportResult]:
    """Every (data, format) pair exported once with export_checkpoint."""
    out = tmp_path_factory.mktemp("exported")
    results = {}
    for name, (_, params) in (("digits", digits), ("binary", binary), ("residual", residual)):
        for fmt in ex.FORMATS:
            target = out / name / f"model.{fmt}"
            results[name, fmt] = ex.export_checkpoint(params, fmt, target)
    return results


def _one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("convpipe: error: ")
    return err


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["digits", "binary", "residual"])
@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_exported_file_matches_checkpoint_on_test_split(
    request, exported, name: str, fmt: str
) -> None:
    _, params = request.getfixturevalue(name)
    result = exported[name, fmt]
    reference, dataset = _reference(params)
    assert result.path.is_file() and result.path.stat().st_size == result.size
    assert result.parity.ok and result.parity.images == len(dataset) > 0
    assert result.parity.max_abs_diff <= 1e-5

    # the written file, loaded as a consumer would, on the whole test split in one batch
    run, _ = ex.load_exported(result.path, fmt)
    images, _ = dataset.__getitems__(list(range(len(dataset))))
    logits = run(images)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert float((logits - reference).abs().max()) <= 1e-5
    assert float(reference.abs().max()) > 0.1  # a real network, not all zeros


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_batch_dimension_is_free(exported, fmt: str) -> None:
    run, _ = ex.load_exported(exported["digits", fmt].path, fmt)
    for n in (1, 3, 600):
        assert tuple(run(torch.randn(n, 1, 8, 8)).shape) == (n, 10)
    run, _ = ex.load_exported(exported["binary", fmt].path, fmt)
    assert tuple(run(torch.randn(5, 3, 16, 16)).shape) == (5,)


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_binary_export_gives_sigmoid_probabilities_of_class_one(binary, exported, fmt) -> None:
    _, params = binary
    reference, dataset = _reference(params)
    run, metadata = ex.load_exported(exported["binary", fmt].path, fmt)
    images, _ = dataset.__getitems__(list(range(len(dataset))))
    p_dog = torch.sigmoid(run(images))
    expected = probabilities(reference, 2)[:, 1]
    assert float((p_dog - expected).abs().max()) <= 1e-6
    assert metadata["probabilities"] == "sigmoid" and metadata["output_shape"] == ["N"]
    assert metadata["class_names"] == ["cat", "dog"]
    assert "probability of 'dog'" in metadata["postprocessing"]


def test_wrong_input_shape_is_refused_by_the_torchscript_model(exported) -> None:
    run, _ = ex.load_exported(exported["digits", "torchscript"].path, "torchscript")
    with pytest.raises(torch.jit.Error, match=r"expected a float32 batch of shape \(N, 1, 8, 8\)"):
        run(torch.zeros(2, 3, 8, 8))


def test_parity_by_hand() -> None:
    ref = torch.tensor([[1.0, -2.0], [30.0, 0.5]])
    same = ex.parity(ref, ref.clone())
    assert same == ex.Parity(2, 0.0, 30.0) and same.ok
    off = ex.parity(ref, ref + torch.tensor([[0.0, 0.0], [0.0, 2**-16]]))  # exact in float32
    assert off.max_abs_diff == 2**-16 > ex.TOLERANCE and not off.ok
    at_tolerance = ex.parity(torch.zeros(3), torch.full((3,), ex.TOLERANCE))
    assert at_tolerance.ok
    nan = ex.parity(ref, ref.clone().fill_(float("nan")))
    assert nan.max_abs_diff == float("inf") and not nan.ok
    assert ex.parity(torch.zeros(0, 3), torch.zeros(0, 3)) == ex.Parity(0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ex.parity(torch.zeros(2, 1), torch.zeros(2))


# --------------------------------------------------------------------------- metadata


def test_pt2_loads_with_plain_torch_export_and_refuses_a_wrong_shape(digits, exported) -> None:
    path = exported["digits", "pt2"].path
    extra = {"convpipe.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["convpipe.json"])["input_shape"] == ["N", 1, 8, 8]
    net = program.module()
    _, params = digits
    reference, dataset = _reference(params)
    images, _ = dataset.__getitems__(list(range(len(dataset))))
    with torch.no_grad():
        assert float((net(images) - reference).abs().max()) <= 1e-5
    assert float(reference.abs().max()) > 0.1
    # the channel and size dimensions are fixed in the program: other ones are refused
    guard = r"Guard failed: .*size\(\)\[1\] == 1"
    with torch.no_grad(), pytest.raises(AssertionError, match=guard):
        net(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_metadata_round_trips(digits, exported, fmt: str) -> None:
    _, params = digits
    manifest = load_manifest(params.paths.prepared)
    expected = ex.export_metadata(load_model(params.paths.model), manifest)
    _, metadata = ex.load_exported(exported["digits", fmt].path, fmt)
    assert metadata == expected
    assert metadata["class_names"] == [str(i) for i in range(10)]
    assert metadata["mean"] == manifest.mean and metadata["std"] == manifest.std
    assert metadata["channels"] == 1 and metadata["image_size"] == [8, 8]
    assert metadata["input_shape"] == ["N", 1, 8, 8] and metadata["output_shape"] == ["N", 10]
    assert metadata["probabilities"] == "softmax"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_fitted_temperature_is_in_the_export_and_its_metadata(digits, tmp_path, fmt) -> None:
    _, params = digits
    calibration = Path(params.paths.calibration)
    digest = checkpoint_digest(params.paths.model)
    write_calibration(calibration, Calibration("temperature", 1.75, digest, "val", 40))
    try:
        result = ex.export_checkpoint(params, fmt, tmp_path / f"model.{fmt}")
    finally:
        calibration.unlink()
    reference, dataset = _reference(params)  # the network's own logits
    run, metadata = ex.load_exported(result.path, fmt)
    images, _ = dataset.__getitems__(list(range(len(dataset))))
    assert float((run(images) - reference / 1.75).abs().max()) <= 1e-5
    assert metadata["temperature"] == 1.75
    assert "already divided by the temperature 1.75" in metadata["postprocessing"]


def test_onnx_file_is_valid_and_readable_without_convpipe(digits, exported) -> None:
    path = exported["digits", "onnx"].path
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not list(path.parent.glob("*.data"))  # weights inside, one self-contained file
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("images", ["N", 1, 8, 8], "tensor(float)")
    assert (out.name, out.shape) == ("logits", ["N", 10])
    props = session.get_modelmeta().custom_metadata_map
    assert props["probabilities"] == "softmax" and props["class_names"].startswith('["0", "1"')
    _, params = digits
    manifest = load_manifest(params.paths.prepared)
    # a consumer's whole pipeline from the metadata alone: uint8 HWC -> normalise -> softmax
    x, _ = load_split(params.paths.prepared, manifest, "test")
    mean = np.array(json.loads(props["mean"]), dtype=np.float32)
    std = np.array(json.loads(props["std"]), dtype=np.float32)
    images = ((np.asarray(x, dtype=np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    (logits,) = session.run(None, {"images": images.astype(np.float32)})
    reference, _ = _reference(params)
    assert np.abs(logits - reference.numpy()).max() <= 1e-5


def test_default_output_beside_the_checkpoint() -> None:
    assert ex.default_output("models/model.ckpt", "onnx") == Path("models/model.onnx")
    assert ex.default_output("m/best.ckpt", "torchscript") == Path("m/best.torchscript.pt")


def test_cli_accepts_every_export_format() -> None:
    parser = build_parser()
    for fmt in ex.FORMATS:
        assert parser.parse_args(["export", "--format", fmt]).format == fmt
    assert parser.parse_args(["export", "--format", "onnx", "--output", "x"]).output == "x"


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_cli_writes_beside_the_checkpoint_and_says_so(digits, capsys, fmt: str) -> None:
    params_path, params = digits
    target = ex.default_output(params.paths.model, fmt)
    target.unlink(missing_ok=True)
    code, out, err = run_cli(capsys, "--params", str(params_path), "export", "--format", fmt)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith(f"{target}: {fmt} export of ")
    assert "test images (tolerance 1e-05)" in out
    count = load_manifest(params.paths.prepared).splits["test"].count
    assert f"on {count} test images" in out
    assert target.is_file() and not list(target.parent.glob(".*.tmp"))
    run, metadata = ex.load_exported(target, fmt)
    assert metadata["num_classes"] == 10
    reference, dataset = _reference(params)
    assert float((ex.run_batches(run, dataset) - reference).abs().max()) <= 1e-5


def test_cli_output_option(digits, tmp_path, capsys) -> None:
    params_path, _ = digits
    target = tmp_path / "deep" / "er" / "net.pt"
    argv = ["--params", str(params_path), "export", "--format", "torchscript"]
    code, out, _ = run_cli(capsys, *argv, "--output", str(target))
    assert code == 0 and out.startswith(f"{target}: torchscript export")
    assert target.is_file()


def test_cli_missing_checkpoint(raw_params, digits, tmp_path, capsys) -> None:
    _, params = digits
    raw = copy.deepcopy(raw_params)
    raw["paths"]["prepared"] = params.paths.prepared
    raw["paths"]["model"] = str(tmp_path / "models" / "model.ckpt")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    for fmt in ex.FORMATS:
        result = run_cli(capsys, "--params", str(params_file), "export", "--format", fmt)
        err = _one_error_line(*result)
        assert "checkpoint not found" in err and "dvc repro train" in err
    assert not (tmp_path / "models").exists()


def test_cli_refuses_bad_outputs(digits, tmp_path, capsys) -> None:
    params_path, params = digits
    checkpoint = Path(params.paths.model)
    before = checkpoint.read_bytes()
    argv = ["--params", str(params_path), "export", "--format", "torchscript", "--output"]
    err = _one_error_line(*run_cli(capsys, *argv, str(checkpoint)))
    assert "--output is the checkpoint itself" in err
    assert checkpoint.read_bytes() == before
    err = _one_error_line(*run_cli(capsys, *argv, str(tmp_path)))
    assert "--output is a folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _one_error_line(*run_cli(capsys, *argv, str(blocker / "model.pt")))
    assert "cannot write the export" in err
    assert blocker.read_text() == "not a folder"
    code, out, err = run_cli(capsys, "--params", str(params_path), "export", "--format", "tflite")
    assert code == 2 and out == "" and "invalid choice: 'tflite'" in err


def test_cli_refuses_data_of_another_model(digits, binary, raw_params, tmp_path, capsys) -> None:
    _, digit_params = digits
    _, binary_params = binary
    raw = copy.deepcopy(raw_params)
    raw["paths"]["prepared"] = binary_params.paths.prepared
    raw["paths"]["model"] = digit_params.paths.model
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    target = tmp_path / "model.onnx"
    argv = ["--params", str(params_file), "export", "--format", "onnx", "--output", str(target)]
    err = _one_error_line(*run_cli(capsys, *argv))
    assert "trained on 1x8x8 images but the prepared data is 3x16x16" in err
    assert not target.exists()


def test_onnx_without_the_extra_says_how_to_install(digits, tmp_path, monkeypatch, capsys) -> None:
    params_path, _ = digits
    # what `import onnxruntime` does when the package is not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    target = tmp_path / "model.onnx"
    argv = ["--params", str(params_path), "export", "--format", "onnx", "--output", str(target)]
    err = _one_error_line(*run_cli(capsys, *argv))
    assert "needs the Python package onnxruntime" in err
    assert "pip install 'convpipe[onnx]'" in err
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ConvpipeError, match=r"convpipe\[onnx\]"):
        ex.require_onnx()


def test_export_that_misses_the_tolerance_writes_nothing(raw_params, tmp_path, capsys) -> None:
    """Logits around 1e5 are beyond float32's 1e-5 resolution: ONNX Runtime cannot match them."""
    params_path, params = _setup(raw_params, tmp_path, {})
    checkpoint = torch.load(params.paths.model, map_location="cpu", weights_only=True)
    for key in ("net.classifier.out.weight", "net.classifier.out.bias"):
        checkpoint["state_dict"][key] *= 1e5
    torch.save(checkpoint, params.paths.model)
    capsys.readouterr()  # what training printed
    target = tmp_path / "model.onnx"
    argv = ["--params", str(params_path), "export", "--format", "onnx", "--output", str(target)]
    err = _one_error_line(*run_cli(capsys, *argv))
    assert "the onnx export differs from the checkpoint by up to" in err
    assert "(tolerance 1e-05; logits up to" in err and "nothing was written" in err
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


def test_serialize_exports_eval_mode_and_restores_the_mode(digits) -> None:
    _, params = digits
    model = load_model(params.paths.model)
    reference, dataset = _reference(params)
    model.train()  # dropout 0.5 and batch statistics: logits would differ on every call
    data = ex.serialize(model, "torchscript", {"k": "v"})
    assert model.training
    run, metadata = ex.load_exported(data, "torchscript")
    assert metadata == {"k": "v"}
    assert ex.parity(reference, ex.run_batches(run, dataset)).ok
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        ex.serialize(model, "tflite", {})

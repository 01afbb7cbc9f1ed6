"""inference.py and `convpipe summary` / `convpipe predict`: numbers by hand, CLI outputs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convpipe.config.schema import ModelParams, Params
from convpipe.data.datasets import ArrayDataset
from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.transforms.normalize import BatchTransform
from convpipe.inference.predict import find_images, predict_images, predict_logits
from convpipe.models.checkpoint import load_model
from convpipe.models.module import CNNClassifier
from convpipe.models.network import build_cnn, count_parameters
from convpipe.tools.predict import format_predictions
from convpipe.tools.summary import dense_equivalent_parameters, receptive_fields
from tests.helpers.cli import run_cli
from tests.helpers.factories import params_in, prepared, tiny_checkpoint
from tests.helpers.models import TINY_CONV, model_section


def _block(padding: str, filters: int) -> dict[str, Any]:
    return {
        "filters": filters,
        "kernel": 3,
        "stride": 1,
        "padding": padding,
        "activation": "relu",
        "batch_norm": False,
        "pool": "max",
        "pool_size": 2,
    }


# 28x28x1: conv 3x3/1 same 1->4, max pool 2, conv 3x3/1 valid 4->8, max pool 2, output 10
KNOWN = ModelParams.model_validate(model_section([_block("same", 4), _block("valid", 8)], [], 0.0))


def test_receptive_fields_and_jumps_by_hand() -> None:
    rows = receptive_fields(KNOWN, 1, (28, 28), 10)
    assert [r.name for r in rows] == [
        "model.conv[0]",
        "model.conv[0].pool",
        "model.conv[1]",
        "model.conv[1].pool",
        "flatten",
        "output",
    ]
    # r: 1 + 2*1 = 3, 3 + 1*1 = 4, 4 + 2*2 = 8, 8 + 1*2 = 10; j: 1, 2, 2, 4
    assert [r.receptive_field for r in rows] == [3, 4, 8, 10, None, None]
    assert [r.jump for r in rows] == [1, 2, 2, 4, None, None]
    assert [r.shape for r in rows] == [
        (4, 28, 28),
        (4, 14, 14),
        (8, 12, 12),
        (8, 6, 6),
        (288,),
        (10,),
    ]


def test_dense_equivalent_by_hand() -> None:
    rows = receptive_fields(KNOWN, 1, (28, 28), 10)
    conv0 = 28 * 28 * 1 * (4 * 28 * 28) + 4 * 28 * 28  # 2,461,760
    conv1 = 4 * 14 * 14 * (8 * 12 * 12) + 8 * 12 * 12  # 904,320
    out = 288 * 10 + 10
    assert [r.dense_parameters for r in rows] == [conv0, 0, conv1, 0, 0, out]
    assert [r.parameters for r in rows] == [9 * 4 + 4, 0, 9 * 4 * 8 + 8, 0, 0, out]
    assert dense_equivalent_parameters(KNOWN, 1, (28, 28), 10) == conv0 + conv1 + out == 3_368_970
    assert sum(r.parameters for r in rows) == count_parameters(build_cnn(KNOWN, 1, (28, 28), 10))


def test_strided_conv_multiplies_the_jump() -> None:
    block = {**_block("valid", 2), "kernel": 5, "stride": 2, "pool": "avg", "pool_size": 3}
    params = ModelParams.model_validate(model_section([block, block], [3], 0))
    rows = receptive_fields(params, 3, (64, 64), 2)
    # r: 5, 5+2*2=9, 9+4*6=33, 33+2*12=57; j: 2, 6, 12, 36
    assert [r.receptive_field for r in rows[:4]] == [5, 9, 33, 57]
    assert [r.jump for r in rows[:4]] == [2, 6, 12, 36]


# --------------------------------------------------------------------------- fixtures


def _params_file(raw_params: dict[str, Any], root: Path) -> tuple[Path, Params]:
    return params_in(raw_params, root, model=model_section(TINY_CONV, [8], 0.0))


@pytest.fixture(scope="module")
def setup(raw_params, tmp_path_factory) -> tuple[Path, Params, CNNClassifier]:
    """Prepared digits, and a checkpoint of a tiny CNN for them after one optimiser step."""
    root = tmp_path_factory.mktemp("infer")
    params_path, params = _params_file(raw_params, root)
    return params_path, params, tiny_checkpoint(params, prepared(params), root)


@pytest.fixture(scope="module")
def images(setup, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """12 prepared test images as PNGs in nested folders, plus a corrupt PNG and a text file."""
    _, params, _ = setup
    folder = tmp_path_factory.mktemp("imgs")
    x, _ = load_split(params.paths.prepared, load_manifest(params.paths.prepared), "test")
    x = np.asarray(x[:12])
    for i, image in enumerate(x):
        sub = folder / ("a" if i < 6 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image[:, :, 0]).save(sub / f"img{i:02d}.png")
    (folder / "a" / "broken.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder, x


# --------------------------------------------------------------------------- summary


def test_summary_cli_prints_totals(setup, capsys) -> None:
    params_path, params, model = setup
    code, out, _ = run_cli(capsys, "--params", str(params_path), "summary")
    assert code == 0
    total = count_parameters(model.net)
    dense = dense_equivalent_parameters(params.model, 1, (8, 8), 10)
    assert f"total parameters: {total:,}" in out
    assert f"{dense:,} parameters" in out
    assert "model.conv[0].pool" in out and "input 1x8x8, 10 classes" in out

    code, out, _ = run_cli(capsys, "--params", str(params_path), "summary", "--format", "json")
    data = json.loads(out)
    assert data["total_parameters"] == total and data["dense_equivalent_parameters"] == dense
    assert data["ratio"] == pytest.approx(dense / total)
    assert [row["receptive_field"] for row in data["layers"][:2]] == [3, 4]


def test_summary_without_prepared_data_says_run_prepare(raw_params, tmp_path, capsys) -> None:
    params_path, _ = _params_file(raw_params, tmp_path)
    code, out, err = run_cli(capsys, "--params", str(params_path), "summary")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("convpipe: error: ")
    assert "dvc repro prepare" in err


# --------------------------------------------------------------------------- predict


def test_find_images_recursive_sorted_extensions_only(images) -> None:
    folder, _ = images
    found = find_images([folder])
    assert [Path(p).relative_to(folder).as_posix() for p in found] == [
        "a/broken.png",
        *(f"a/img{i:02d}.png" for i in range(6)),
        *(f"b/img{i:02d}.png" for i in range(6, 12)),
    ]
    assert find_images([folder / "notes.txt"]) == [str(folder / "notes.txt")]


def test_predict_images_top1_matches_predict_logits(setup) -> None:
    _, params, _ = setup
    manifest = load_manifest(params.paths.prepared)
    model = load_model(params.paths.model)
    x, y = load_split(params.paths.prepared, manifest, "test")
    dataset = ArrayDataset(x, y, BatchTransform(None, manifest.mean, manifest.std))
    logits = predict_logits(model, dataset, 64, "none")
    top = predict_images(
        model, np.asarray(x), manifest.mean, manifest.std, top_k=3, tta="none", batch=50
    )
    names = manifest.class_names
    assert [row[0][0] for row in top] == [names[i] for i in logits.argmax(dim=1).tolist()]
    probs = torch.softmax(logits, dim=1)
    assert top[0][0][1] == pytest.approx(float(probs[0].max()))
    assert all(len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1] for row in top)
    with pytest.raises(ValueError, match="top_k"):
        predict_images(model, np.asarray(x[:1]), manifest.mean, manifest.std, top_k=0, tta="none")


def test_predict_folder_with_a_corrupt_file(setup, images, capsys) -> None:
    params_path, params, _ = setup
    folder, x = images
    code, out, err = run_cli(
        capsys, "--params", str(params_path), "predict", str(folder), "--top-k", "2"
    )
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["file", "top", "1", "top", "2"]
    rows = lines[2:]
    assert len(rows) == 13
    assert "broken.png" in rows[0] and "ERROR: not an image" in rows[0]
    # same top-1 as the model on the prepared arrays
    manifest = load_manifest(params.paths.prepared)
    model = load_model(params.paths.model)
    expected = predict_images(model, x, manifest.mean, manifest.std, top_k=1, tta="none")
    assert [row.split()[1] for row in rows[1:]] == [e[0][0] for e in expected]


def test_predict_csv_and_json_outputs_parse(setup, images, tmp_path, capsys) -> None:
    params_path, _, _ = setup
    folder, _ = images
    target = tmp_path / "out" / "preds.csv"
    args = ["--params", str(params_path), "predict", str(folder), "--top-k", "3"]
    code, out, _ = run_cli(capsys, *args, "--format", "csv", "--output", str(target))
    assert code == 0 and "12 predictions, 1 unreadable files" in out
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == 13 and list(rows[0])[-1] == "error"
    assert rows[0]["path"].endswith("broken.png") and rows[0]["error"] == "not an image"
    assert rows[0]["class_1"] == ""
    ok = rows[1]
    assert ok["error"] == "" and float(ok["probability_1"]) >= float(ok["probability_3"])
    assert not list(target.parent.glob(".*.tmp"))  # atomic write left no temporary file

    code, out, _ = run_cli(capsys, *args, "--format", "json")
    data = json.loads(out)
    assert data[0]["error"] == "not an image" and data[0]["predictions"] == []
    assert all(len(d["predictions"]) == 3 and d["error"] is None for d in data[1:])
    assert all(0 <= p["probability"] <= 1 for d in data[1:] for p in d["predictions"])


def test_predict_all_bad_exits_2_with_one_line(setup, images, tmp_path, capsys) -> None:
    params_path, _, _ = setup
    folder, _ = images
    missing = tmp_path / "missing.png"
    argv = ["--params", str(params_path), "predict", str(folder / "a" / "broken.png"), str(missing)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("convpipe: error: none of the 2 files")
    code, _, err = run_cli(capsys, "--params", str(params_path), "predict", str(tmp_path))
    assert code == 2 and "no image files found" in err


def test_format_predictions_table_all_errors_still_renders() -> None:
    from convpipe.inference.predict import Prediction

    text = format_predictions([Prediction("x.png", [], "empty file")], "table", 2)
    assert "ERROR: empty file" in text

"""feature_maps.py and `convpipe feature-maps`: every layer's maps, one panel per channel."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.models.module import CNNClassifier
from convpipe.tools.feature_maps import (
    MAX_COLUMNS,
    feature_maps,
    first_layer_filters,
    picture,
    plot_feature_maps,
)
from tests.helpers.cli import run_cli
from tests.helpers.factories import params_in, prepared, tiny_checkpoint
from tests.helpers.models import TINY_CONV, model_section, residual_stage

# 8x8 digits: conv 3x3 same 1->4 + max pool 2 (4x4), then conv 3x3 valid 4->6 without pooling
# (2x2). Receptive fields by hand: 3, 3 + 1*1 = 4, 4 + 2*2 = 8.
CONV = [
    *TINY_CONV,
    {
        "filters": 6,
        "kernel": 3,
        "stride": 1,
        "padding": "valid",
        "activation": "relu",
        "batch_norm": False,
        "pool": "none",
        "pool_size": 2,
    },
]


@pytest.fixture(scope="module")
def setup(raw_params: dict[str, Any], tmp_path_factory) -> tuple[Path, Any, CNNClassifier]:
    """Prepared digits and a checkpoint of a small two-block CNN (two steps on real digits)."""
    root = tmp_path_factory.mktemp("fmaps")
    params_path, params = params_in(raw_params, root, model=model_section(CONV, [], 0.0))
    manifest = prepared(params)
    model = tiny_checkpoint(params, manifest, root, steps=2, images="train", count=32)
    return params_path, params, model


def _first_test_image(params: Any) -> np.ndarray:
    manifest = load_manifest(params.paths.prepared)
    x, _ = load_split(params.paths.prepared, manifest, "test")
    return np.asarray(x[0])


def test_maps_per_layer_with_shapes_fields_and_values(setup) -> None:
    _, params, model = setup
    manifest = load_manifest(params.paths.prepared)
    image = _first_test_image(params)
    x = normalize_batch(torch.from_numpy(image[None]), manifest.mean, manifest.std)
    layers = feature_maps(model, x)
    assert [layer.name for layer in layers] == [
        "model.conv[0]",
        "model.conv[0].pool",
        "model.conv[1]",
    ]
    assert [tuple(layer.maps.shape) for layer in layers] == [(4, 8, 8), (4, 4, 4), (6, 2, 2)]
    assert [layer.receptive_field for layer in layers] == [3, 4, 8]
    assert layers[0].label.startswith("conv 3x3/1 same 1->4")
    # The maps are what the network computes: block 0's output is the pooled maps, block 1's
    # is the last maps; activations after ReLU are never negative.
    with torch.no_grad():
        block0 = model.net.features[0](x)
        block1 = model.net.features[1](block0)
    torch.testing.assert_close(layers[1].maps, block0[0])
    torch.testing.assert_close(layers[2].maps, block1[0])
    assert all(float(layer.maps.min()) >= 0.0 for layer in layers)
    assert float(layers[0].maps.max()) > 0.0


def test_feature_maps_rejects_a_batch_or_wrong_shape(setup) -> None:
    _, _, model = setup
    with pytest.raises(ValueError, match=r"one image of shape \(1, 1, 8, 8\)"):
        feature_maps(model, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="got"):
        feature_maps(model, torch.zeros(1, 3, 8, 8))


def test_first_layer_filters_are_the_conv_weights(setup) -> None:
    _, _, model = setup
    filters = first_layer_filters(model)
    assert tuple(filters.shape) == (4, 1, 3, 3)
    torch.testing.assert_close(filters, model.net.features[0].conv.weight)


def _panel_counts(fig) -> Counter[str]:
    return Counter(ax.get_label().rsplit("/", 1)[0] for ax in fig.axes)


def test_figure_has_one_panel_per_layer_and_channel(setup) -> None:
    _, params, model = setup
    manifest = load_manifest(params.paths.prepared)
    fig = picture(
        model, _first_test_image(params), manifest.mean, manifest.std, "digit.png", "none"
    )
    assert _panel_counts(fig) == {
        "input": 1,
        "model.conv[0]": 4,
        "model.conv[0].pool": 4,
        "model.conv[1]": 6,
        "filters": 4,
    }
    labels = {ax.get_label() for ax in fig.axes}
    assert {f"model.conv[1]/{c}" for c in range(6)} <= labels
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert titles[0].startswith("digit.png: predicted ")
    assert "4 maps of 4x4, receptive field 4x4" in titles[2]
    assert titles[-1] == "model.conv[0]: the 4 learned 3x3 filters"


def test_wide_rgb_layers_wrap_and_show_colour_filters(raw_params) -> None:
    torch.manual_seed(0)
    block = {**CONV[0], "filters": MAX_COLUMNS + 4}
    model = CNNClassifier(
        model_section([block], [], 0.0),
        raw_params["train"],
        3,
        (12, 12),
        3,
        10,
    )
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    x = normalize_batch(torch.from_numpy(image[None]), [0.5] * 3, [0.25] * 3)
    layers = feature_maps(model, x)
    fig = plot_feature_maps(image, layers, first_layer_filters(model), "rgb")
    counts = _panel_counts(fig)
    assert counts["model.conv[0]"] == counts["filters"] == MAX_COLUMNS + 4
    assert counts["model.conv[0].pool"] == MAX_COLUMNS + 4
    colour = next(ax for ax in fig.axes if ax.get_label() == "filters/0")
    assert colour.get_images()[0].get_array().shape == (3, 3, 3)


def test_cli_writes_the_png(setup, tmp_path, capsys) -> None:
    params_path, params, _ = setup
    source = tmp_path / "digit.png"
    Image.fromarray(_first_test_image(params)[:, :, 0]).save(source)
    out = tmp_path / "maps.png"
    code, stdout, _ = run_cli(
        capsys, "--params", str(params_path), "feature-maps", str(source), "--output", str(out)
    )
    assert code == 0
    assert stdout.startswith(f"{out}: feature maps of digit.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.width >= 600 and png.height > 400


def test_cli_default_output_beside_the_working_dir(setup, tmp_path, capsys, monkeypatch) -> None:
    params_path, params, _ = setup
    source = tmp_path / "seven.png"
    Image.fromarray(_first_test_image(params)[:, :, 0]).save(source)
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, "--params", str(params_path), "feature-maps", str(source))
    assert code == 0
    assert stdout.startswith("seven.feature_maps.png: feature maps of seven.png through 2 conv")
    assert (tmp_path / "seven.feature_maps.png").is_file()


def test_cli_bad_image_is_one_line_and_writes_nothing(setup, tmp_path, capsys) -> None:
    params_path, _, _ = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "maps.png"
    code, _stdout, stderr = run_cli(
        capsys, "--params", str(params_path), "feature-maps", str(bad), "--output", str(out)
    )
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convpipe: error: unreadable image")
    assert str(bad) in lines[0] and "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_residual_blocks_get_one_map_row_each_and_wide_layers_are_capped(raw_params) -> None:
    from convpipe.tools.feature_maps import MAX_MAPS, plot_feature_maps

    model_params = model_section(
        CONV[:1],
        [],
        0.0,
        stages=[residual_stage(4, stride=1), residual_stage(MAX_MAPS + 8, stride=2)],
        global_pool="avg",
    )
    torch.manual_seed(0)
    model = CNNClassifier(model_params, raw_params["train"], 1, (8, 8), 3, 10).eval()
    x = torch.randn(1, 1, 8, 8)
    layers = feature_maps(model, x)
    names = [layer.name for layer in layers]
    assert names == [
        "model.conv[0]",
        "model.conv[0].pool",
        "model.stages[0][0]",
        "model.stages[1][0]",
    ]
    assert [layer.receptive_field for layer in layers] == [3, 4, 12, 24]
    with torch.no_grad():
        pooled = model.net.features[0](x)
        expected = model.net.features.stage1(model.net.features.stage0(pooled))
    torch.testing.assert_close(layers[-1].maps, expected[0])
    fig = plot_feature_maps(np.zeros((8, 8, 1), np.uint8), layers, first_layer_filters(model), "x")
    labels = {ax.get_label() for ax in fig.get_axes()}
    assert f"model.stages[1][0]/{MAX_MAPS - 1}" in labels
    assert f"model.stages[1][0]/{MAX_MAPS}" not in labels
    titles = [sub._suptitle.get_text() for sub in fig.subfigs if sub._suptitle is not None]
    assert any(f"{MAX_MAPS + 8} maps of 2x2 (the first {MAX_MAPS})" in t for t in titles)

"""The augment stage: seeded copies of the train split only, the saved pipeline, the preview."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from convpipe.data.augment import PIPELINE_FILE, PREVIEW_VERSIONS, preview_indices, write_augmented
from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.prepare import write_prepared
from convpipe.data.sources import open_source
from convpipe.data.transforms.preview import preview_grid
from convpipe.errors import ConvpipeError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, raw_params):
    from convpipe.config.schema import parse_params

    root = tmp_path_factory.mktemp("prep")
    raw = {**raw_params, "paths": {**raw_params["paths"], "prepared": str(root / "prepared")}}
    params = parse_params(raw)
    write_prepared(open_source(params.data), params.data, params.base.seed, params.paths.prepared)
    return root / "prepared"


def _augment(make_params, prepared, out, **overrides):
    params = make_params(
        **{
            "paths.prepared": str(prepared),
            "paths.augmented": str(out / "augmented"),
            "paths.augment_preview": str(out / "preview.png"),
            **overrides,
        }
    )
    return params, write_augmented(params)


def test_same_seed_same_bytes_other_seed_differs(make_params, prepared, tmp_path):
    _augment(make_params, prepared, tmp_path / "a")
    _augment(make_params, prepared, tmp_path / "b")
    _augment(make_params, prepared, tmp_path / "c", **{"base.seed": 7})
    a, b, c = (tmp_path / k / "augmented" for k in "abc")
    for name in ("train_x.npy", "train_y.npy", PIPELINE_FILE, "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train_x.npy").read_bytes() != (c / "train_x.npy").read_bytes()
    assert (tmp_path / "a/preview.png").read_bytes() == (tmp_path / "b/preview.png").read_bytes()


def test_only_the_train_split_is_augmented(make_params, prepared, tmp_path):
    before = {s: (prepared / f"{s}_x.npy").read_bytes() for s in ("val", "test")}
    _, manifest = _augment(make_params, prepared, tmp_path, **{"augment.copies": 2})
    assert list(manifest.splits) == ["train"]
    source = load_manifest(prepared)
    x, y = load_split(tmp_path / "augmented", manifest, "train")
    px, py = load_split(prepared, source, "train")
    assert x.shape == (2 * px.shape[0], *px.shape[1:])
    np.testing.assert_array_equal(y, np.tile(py, 2))
    assert not np.array_equal(x[: px.shape[0]], px)  # the copies really are augmented
    assert {s: (prepared / f"{s}_x.npy").read_bytes() for s in ("val", "test")} == before
    assert manifest.mean == source.mean and manifest.class_names == source.class_names


def test_saved_pipeline_loads_with_albumentations(make_params, prepared, tmp_path):
    _augment(make_params, prepared, tmp_path)
    pipeline = A.load(str(tmp_path / "augmented" / PIPELINE_FILE), data_format="json")
    names = {type(t).__name__ for t in pipeline.transforms}
    assert {"Affine", "GaussNoise"} <= names
    image = np.zeros((8, 8, 1), dtype=np.uint8)
    assert pipeline(image=image)["image"].shape == (8, 8, 1)


def test_preview_shows_one_row_per_sample(make_params, prepared, tmp_path):
    _augment(make_params, prepared, tmp_path, **{"augment.preview_count": 5})
    with Image.open(tmp_path / "preview.png") as img:
        shown = np.asarray(img)
    blank = np.zeros((5, 8, 8, 1), dtype=np.uint8)
    expected = preview_grid(blank, [blank] * PREVIEW_VERSIONS)
    assert shown.shape[:2] == expected.shape[:2]  # 5 rows: original + 4 augmented versions
    picks = preview_indices(np.array([0, 0, 1, 1, 2, 2]), 4)
    assert picks.tolist() == [0, 2, 4, 1]


def test_zero_copies_writes_an_empty_split(make_params, prepared, tmp_path):
    _, manifest = _augment(make_params, prepared, tmp_path, **{"augment.copies": 0})
    x, y = load_split(tmp_path / "augmented", manifest, "train")
    assert x.shape[0] == 0 and y.shape == (0,)


def test_colour_jitter_on_grayscale_is_refused_and_writes_nothing(make_params, prepared, tmp_path):
    with pytest.raises(ConvpipeError, match=r"augment\.color_jitter\.saturation"):
        _augment(
            make_params,
            prepared,
            tmp_path,
            **{"augment.color_jitter.p": 0.5, "augment.color_jitter.saturation": 0.3},
        )
    assert not (tmp_path / "augmented").exists()
    assert not (tmp_path / "preview.png").exists()

"""The prepare stage end to end on every source, from generated data."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.prepare import SKIPPED_REPORT, write_prepared
from convpipe.data.sources import open_source
from convpipe.errors import ConvpipeError
from tests.helpers import datagen
from tests.helpers.project import ROOT


def _prepare(make_params, tmp_path, **overrides):
    params = make_params(**{"paths.prepared": str(tmp_path / "prepared"), **overrides})
    manifest = write_prepared(
        open_source(params.data), params.data, params.base.seed, params.paths.prepared
    )
    return params, manifest


def _counts(manifest):
    return {name: info.count for name, info in manifest.splits.items()}


def test_digits_default(make_params, tmp_path):
    _, manifest = _prepare(make_params, tmp_path)
    assert manifest.num_classes == 10 and manifest.channels == 1 and manifest.image_hw == (8, 8)
    assert sum(_counts(manifest).values()) == 1797
    x, y = load_split(tmp_path / "prepared", manifest, "train")
    assert x.dtype == np.uint8 and x.shape == (manifest.splits["train"].count, 8, 8, 1)
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("fmt", ["png", "jpg", "gif"])
def test_imagefolder_flat_is_split_stratified(make_params, tmp_path, fmt):
    root = datagen.write_imagefolder(
        tmp_path / "imgs", fmt=fmt, n_per_class=20, classes=("cat", "dog", "eel")
    )
    _, manifest = _prepare(
        make_params,
        tmp_path,
        **{
            "data.source": "imagefolder",
            "data.path": str(root),
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.1,
        },
    )
    assert manifest.class_names == ["cat", "dog", "eel"]
    assert manifest.image_hw == (16, 16)
    for name in ("cat", "dog", "eel"):
        assert manifest.splits["val"].per_class[name] == 4
        assert manifest.splits["test"].per_class[name] == 2
        assert manifest.splits["train"].per_class[name] == 14


def test_imagefolder_given_splits_are_kept(make_params, tmp_path):
    root = datagen.write_imagefolder(tmp_path / "imgs", layout="split", n_per_class=4)
    _, manifest = _prepare(
        make_params, tmp_path, **{"data.source": "imagefolder", "data.path": str(root)}
    )
    assert _counts(manifest) == {"train": 12, "val": 12, "test": 12}


def test_mnist_idx_keeps_test_and_carves_val(make_params, tmp_path):
    for gz in (False, True):
        root = datagen.write_idx(tmp_path / f"idx{gz}", gz=gz, n_train=100, n_test=30)
        out = tmp_path / f"out{gz}"
        _, manifest = _prepare(
            make_params, out, **{"data.source": "mnist_idx", "data.path": str(root)}
        )
        counts = _counts(manifest)
        assert counts["test"] == 30
        assert counts["train"] + counts["val"] == 100
        assert manifest.image_hw == (28, 28) and manifest.channels == 1


def test_cifar10(make_params, tmp_path):
    root = datagen.write_cifar(tmp_path / "c10", kind="cifar10", n=60, n_test=20)
    _, manifest = _prepare(
        make_params, tmp_path, **{"data.source": "cifar", "data.path": str(root)}
    )
    assert manifest.channels == 3 and manifest.image_hw == (32, 32)
    assert manifest.splits["test"].count == 20
    assert manifest.class_names[:2] == ["airplane", "automobile"]
    assert len(manifest.mean) == 3


def test_cifar100_class_without_images_is_named(make_params, tmp_path):
    # the generated CIFAR-100 folder uses 10 of the 100 fine classes its meta file names
    root = datagen.write_cifar(tmp_path / "c100", kind="cifar100", n=60, n_test=20)
    with pytest.raises(ConvpipeError, match="has no usable images"):
        _prepare(make_params, tmp_path, **{"data.source": "cifar", "data.path": str(root)})


def test_csv(make_params, tmp_path):
    path = datagen.write_csv(tmp_path / "train.csv", header=True, n=90, image_shape=(8, 8))
    _, manifest = _prepare(
        make_params,
        tmp_path,
        **{"data.source": "csv", "data.path": str(path), "data.csv.image_shape": [8, 8]},
    )
    assert sum(_counts(manifest).values()) == 90
    assert manifest.image_hw == (8, 8)


def test_mixed_modes_become_configured_channels_and_size(make_params, tmp_path):
    root = tmp_path / "mixed"
    for cls in ("a", "b"):
        folder = root / cls
        folder.mkdir(parents=True)
        datagen.write_16bit_png(folder, name="s16.png")
        datagen.write_cmyk_jpeg(folder, name="cmyk.jpg")
        datagen.write_rgba_png(folder, name="rgba.png")
        datagen.write_palette_png(folder, name="pal.png")
        for k in range(3):
            datagen.save_image(datagen.digits_of_class(k, 1, 12)[0], folder / f"g{k}.png")
    _, manifest = _prepare(
        make_params,
        tmp_path,
        **{
            "data.source": "imagefolder",
            "data.path": str(root),
            "data.image_size": [10, 14],
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.2,
        },
    )
    assert manifest.channels == 3 and manifest.image_hw == (10, 14)
    x, _ = load_split(tmp_path / "prepared", manifest, "train")
    assert x.shape[1:] == (10, 14, 3)
    _, gray = _prepare(
        make_params,
        tmp_path / "g",
        **{
            "data.source": "imagefolder",
            "data.path": str(root),
            "data.image_size": 9,
            "data.channels": 1,
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.2,
        },
    )
    assert gray.channels == 1 and gray.image_hw == (9, 9)


def test_same_seed_gives_identical_bytes(make_params, tmp_path):
    _, one = _prepare(make_params, tmp_path / "one")
    _, two = _prepare(make_params, tmp_path / "two")
    _, other = _prepare(make_params, tmp_path / "three", **{"base.seed": 1})
    assert one.content_hash == two.content_hash
    for name in ("train_x.npy", "test_y.npy", "manifest.json"):
        assert (tmp_path / "one/prepared" / name).read_bytes() == (
            tmp_path / "two/prepared" / name
        ).read_bytes()
    assert other.content_hash != one.content_hash


def test_mean_std_come_from_train_split_only(make_params, tmp_path):
    _, manifest = _prepare(make_params, tmp_path)
    x, _ = load_split(tmp_path / "prepared", manifest, "train")
    scaled = np.asarray(x, dtype=np.float64) / 255.0
    np.testing.assert_allclose(manifest.mean, [scaled.mean()], rtol=1e-9)
    np.testing.assert_allclose(manifest.std, [scaled.std()], rtol=1e-7)
    everything = np.concatenate(
        [
            np.asarray(load_split(tmp_path / "prepared", manifest, s)[0])
            for s in ("train", "val", "test")
        ]
    )
    assert abs(everything.mean() / 255.0 - manifest.mean[0]) > 1e-6


def _bad_folder(tmp_path, writer):
    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=6, classes=("a", "b"))
    bad = writer(root / "a")
    return root, bad


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (datagen.write_zero_byte, "empty file"),
        (datagen.write_truncated_png, "truncated"),
        (datagen.write_not_an_image, "not an image"),
    ],
)
def test_bad_file_is_an_error_naming_it_and_writes_nothing(make_params, tmp_path, writer, reason):
    root, bad = _bad_folder(tmp_path, writer)
    overrides = {"data.source": "imagefolder", "data.path": str(root), "data.image_size": 16}
    with pytest.raises(ConvpipeError) as info:
        _prepare(make_params, tmp_path, **overrides)
    assert reason in str(info.value) and str(bad) in str(info.value)
    assert not (tmp_path / "prepared").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_skip_mode_counts_and_lists_bad_files(make_params, tmp_path):
    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=6, classes=("a", "b"))
    bad = [
        datagen.write_zero_byte(root / "a"),
        datagen.write_truncated_png(root / "b"),
        datagen.write_not_an_image(root / "b"),
    ]
    _, manifest = _prepare(
        make_params,
        tmp_path,
        **{
            "data.source": "imagefolder",
            "data.path": str(root),
            "data.on_bad_file": "skip",
            "data.image_size": 16,
        },
    )
    assert manifest.skipped.count == 3
    assert sum(_counts(manifest).values()) == 12
    with open(tmp_path / "prepared" / SKIPPED_REPORT) as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in bad)
    assert all(r["reason"] for r in rows)


def test_single_class_is_refused(make_params, tmp_path):
    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=6, classes=("only",))
    with pytest.raises(ConvpipeError, match="at least 2"):
        _prepare(make_params, tmp_path, **{"data.source": "imagefolder", "data.path": str(root)})


def test_class_too_small_to_stratify(make_params, tmp_path):
    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=6, classes=("a", "b"))
    for extra in sorted((root / "b").iterdir())[2:]:
        extra.unlink()
    with pytest.raises(ConvpipeError, match="class 'b' has 2 image"):
        _prepare(make_params, tmp_path, **{"data.source": "imagefolder", "data.path": str(root)})


def test_failed_run_keeps_previous_good_output(make_params, tmp_path):
    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=6, classes=("a", "b"))
    overrides = {"data.source": "imagefolder", "data.path": str(root), "data.image_size": 16}
    _prepare(make_params, tmp_path, **overrides)
    before = (tmp_path / "prepared/train_x.npy").read_bytes()
    datagen.write_truncated_png(root / "a")
    with pytest.raises(ConvpipeError):
        _prepare(make_params, tmp_path, **overrides)
    assert (tmp_path / "prepared/train_x.npy").read_bytes() == before
    assert load_manifest(tmp_path / "prepared").splits["train"].count > 0


def _run_stage(tmp_path, params_text: str):
    (tmp_path / "params.yaml").write_text(params_text)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines/prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_stage_reports_user_errors_in_one_line(tmp_path):
    shipped = (ROOT / "params.yaml").read_text()
    missing = re.sub(
        r"(?m)^  path:.*$",
        f"  path: {tmp_path / 'nowhere'}",
        shipped.replace("source: digits", "source: imagefolder"),
    )
    assert f"path: {tmp_path / 'nowhere'}" in missing
    for text, expect in (
        (shipped.replace("  seed: 42", "  seed: 42\n  sead: 1"), "did you mean 'base.seed'"),
        (missing, "nowhere"),
    ):
        proc = _run_stage(tmp_path, text)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convpipe: error: ")
        assert expect in lines[0]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "data").exists()


def test_stage_debug_shows_traceback(tmp_path):
    shipped = (ROOT / "params.yaml").read_text().replace("  seed: 42", "  seed: 42\n  sead: 1")
    (tmp_path / "params.yaml").write_text(shipped)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/prepare.py"), "--debug"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_manifest_records_source_and_counts(make_params, tmp_path):
    _prepare(make_params, tmp_path)
    data = json.loads((tmp_path / "prepared/manifest.json").read_text())
    assert data["source"] == "digits" and data["content_hash"].startswith("sha256:")
    assert sum(data["splits"]["train"]["per_class"].values()) == data["splits"]["train"]["count"]


def _photos(root, sizes) -> None:
    """``root/{train,val,test}/<class>/<k>.jpg`` RGB photos of the given (width, height) sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for name in ("ant", "bee"):
            for k, (width, height) in enumerate(sizes):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg", quality=90)


@pytest.mark.parametrize("resize", ["crop", "pad"])
def test_photos_of_mixed_sizes_are_fitted_as_predict_fits_them(make_params, tmp_path, resize):
    from convpipe.inference.predict import load_image

    _photos(tmp_path / "photos", [(40, 30), (24, 60), (33, 33)])
    params, manifest = _prepare(
        make_params,
        tmp_path,
        **{
            "data.source": "imagefolder",
            "data.path": str(tmp_path / "photos"),
            "data.image_size": 16,
            "data.resize": resize,
        },
    )
    assert manifest.resize == resize and manifest.image_hw == (16, 16)
    x, _ = load_split(params.paths.prepared, manifest, "test")
    files = sorted((tmp_path / "photos/test").rglob("*.jpg"))
    served = [load_image(str(f), 3, (16, 16), resize=manifest.resize) for f in files]
    # every prepared test image is exactly what predict makes of one of the files
    assert len(x) == len(files)
    for row in np.asarray(x):
        assert any(np.array_equal(row, image) for image in served)


def test_fitting_needs_a_size(make_params):
    with pytest.raises(ConvpipeError, match=r"data\.resize crop fits images into data\.image_size"):
        make_params(**{"data.resize": "crop"})


@pytest.mark.parametrize("fmt", ["npy", "litdata"])
def test_every_core_writes_the_bytes_one_core_writes(make_params, tmp_path, monkeypatch, fmt):
    """Decoding on every core given (forked workers) changes nothing that is written."""
    import convpipe.data.prepare as prepare

    root = datagen.write_imagefolder(tmp_path / "imgs", n_per_class=30, classes=("a", "b", "c"))
    datagen.write_truncated_png(root / "b")
    datagen.write_not_an_image(root / "c")
    params = {
        "data.source": "imagefolder",
        "data.path": str(root),
        "data.image_size": 16,
        "data.on_bad_file": "skip",
        "data.format": fmt,
        "data.chunk_size": 16,  # several chunks a split
    }
    _prepare(make_params, tmp_path / "one", **params)
    pids = tmp_path / "pids"
    pids.mkdir()
    decode_piece = prepare._decode_piece

    def witnessed(plan, name, positions):  # runs in the forked workers (never pickled)
        (pids / str(os.getpid())).touch()
        return decode_piece(plan, name, positions)

    monkeypatch.setattr(prepare, "_decode_piece", witnessed)
    monkeypatch.setattr(prepare, "PARALLEL_FROM", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2})
    _prepare(make_params, tmp_path / "three", **params)
    assert len({p.name for p in pids.iterdir()} - {str(os.getpid())}) >= 2
    one, three = tmp_path / "one/prepared", tmp_path / "three/prepared"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(three) for p in three.rglob("*") if p.is_file())
    for name in files:
        assert (one / name).read_bytes() == (three / name).read_bytes(), name
    with pytest.raises(ConvpipeError, match="unreadable image"):
        _prepare(make_params, tmp_path / "strict", **{**params, "data.on_bad_file": "error"})

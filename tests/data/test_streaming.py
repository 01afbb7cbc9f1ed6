"""data.format: litdata: LitData chunks written by prepare/augment, read by index and streamed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convpipe.config.schema import Params
from convpipe.data.augment import write_augmented
from convpipe.data.datamodule import ConvDataModule
from convpipe.data.manifest import load_manifest, load_split
from convpipe.data.streaming import (
    INDEX,
    ShardWriter,
    StreamedImages,
    chunk_files,
    item_count,
    open_split,
)
from convpipe.errors import ConvpipeError
from convpipe.io import content_hash
from tests.helpers import factories
from tests.helpers.datagen import image_number, write_numbered_csv
from tests.helpers.project import ROOT, project_env

# --------------------------------------------------------------------------- the format


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12, 10, 3), dtype=np.uint8), rng.integers(0, 5, n)


def _write(folder: Path, images: np.ndarray, labels: np.ndarray) -> str:
    writer = ShardWriter(folder, chunk_bytes=20_000)  # ~50 images a chunk: several chunks
    for start in range(0, len(images), 64):
        writer.write(images[start : start + 64], labels[start : start + 64])
    return writer.close()


def test_written_images_read_back_exactly_by_int_slice_and_index_array(tmp_path):
    images, labels = _images(300)
    _write(tmp_path / "split", images, labels)
    assert len(chunk_files(tmp_path / "split")) > 3
    assert item_count(tmp_path / "split") == 300
    x = StreamedImages(str(tmp_path / "split"), images.shape)
    assert np.array_equal(x[7], images[7])
    assert np.array_equal(x[-1], images[-1])
    assert np.array_equal(x[10:130:3], images[10:130:3])
    picks = np.array([299, 0, 151, 52, 52])
    assert np.array_equal(x[picks], images[picks])
    assert np.array_equal(np.asarray(x), images)
    assert x.dtype == np.uint8 and x.shape == images.shape and len(x) == 300


def test_the_same_images_give_the_same_bytes_and_the_index_is_keyed_by_their_hash(tmp_path):
    images, labels = _images(200)
    first = _write(tmp_path / "a", images, labels)
    second = _write(tmp_path / "b", images, labels)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first == second == content_hash(chunk_files(tmp_path / "a"))
    index = json.loads((tmp_path / "a" / INDEX).read_text())
    assert index["updated_at"] == first.replace(":", "-")  # LitData's cache key
    images[5, 0, 0, 0] ^= 1
    assert _write(tmp_path / "c", images, labels) != first


def test_an_empty_split_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConvpipeError, match="no image of this split could be written"):
        ShardWriter(tmp_path / "empty").close()


@pytest.mark.parametrize("damage", ["missing", "not json", "no chunks"])
def test_a_damaged_index_is_one_error_line(tmp_path, damage):
    images, labels = _images(20)
    _write(tmp_path / "split", images, labels)
    index = tmp_path / "split" / INDEX
    if damage == "missing":
        index.unlink()
    else:
        index.write_text("{not json" if damage == "not json" else '{"config": {}}')
    with pytest.raises(ConvpipeError, match=r"LitData index.*|no LitData index\.json found"):
        item_count(tmp_path / "split")


# --------------------------------------------------------------------------- prepare, augment


def _params(raw: dict[str, Any], root: Path, fmt: str, **overrides: Any) -> Params:
    return factories.params_in(
        raw, root, mlflow_store=True, overrides={"data.format": fmt, **overrides}
    )[1]


@pytest.fixture(scope="module")
def both(raw_params, tmp_path_factory) -> dict[str, Params]:
    """The digits prepared and augmented in each format, same params otherwise."""
    out = {}
    for fmt in ("npy", "litdata"):
        params = _params(raw_params, tmp_path_factory.mktemp(fmt), fmt)
        factories.prepared(params)
        write_augmented(params)
        out[fmt] = params
    return out


def _rows(x: Any) -> list[str]:
    return [hashlib.sha1(np.asarray(img).tobytes()).hexdigest() for img in np.asarray(x)]


def test_litdata_holds_the_npy_splits_val_and_test_in_order_train_shuffled(both):
    npy, lit = (load_manifest(both[f].paths.prepared) for f in ("npy", "litdata"))
    assert (npy.format, lit.format) == ("npy", "litdata")
    assert lit.mean == npy.mean and lit.std == npy.std and lit.splits.keys() == npy.splits.keys()
    for name in ("val", "test"):
        x_npy, y_npy = load_split(both["npy"].paths.prepared, npy, name)
        x_lit, y_lit = load_split(both["litdata"].paths.prepared, lit, name)
        assert isinstance(x_lit, StreamedImages)
        assert np.array_equal(np.asarray(x_lit), x_npy) and np.array_equal(y_lit, y_npy)
    x_npy, y_npy = load_split(both["npy"].paths.prepared, npy, "train")
    x_lit, y_lit = load_split(both["litdata"].paths.prepared, lit, "train")
    npy_rows, lit_rows = _rows(x_npy), _rows(x_lit)
    pairs = [
        sorted(zip(r, y.tolist(), strict=True)) for r, y in ((npy_rows, y_npy), (lit_rows, y_lit))
    ]
    assert pairs[0] == pairs[1]
    assert npy_rows != lit_rows  # stored in a seeded random order: chunks mix the classes
    first_chunk = y_lit[:200]
    assert len(set(first_chunk.tolist())) == 10
    assert lit.splits["train"].x == "train" and lit.content_hash != npy.content_hash


def test_augmented_copies_in_litdata_are_the_npy_copies_of_the_same_images(both):
    lit = load_manifest(both["litdata"].paths.augmented)
    assert lit.format == "litdata" and lit.stage == "augment"
    x, y = load_split(both["litdata"].paths.augmented, lit, "train")
    prepared_y = load_split(both["litdata"].paths.prepared, lit, "train")[1]
    assert np.array_equal(y, prepared_y) and len(x) == lit.splits["train"].count


def test_no_augmented_copies_in_litdata(raw_params, tmp_path):
    params = _params(raw_params, tmp_path, "litdata", **{"augment.copies": 0})
    factories.prepared(params)
    manifest = write_augmented(params)
    assert manifest.splits["train"].count == 0
    assert not (Path(params.paths.augmented) / "train").exists()
    dm = _datamodule(params)
    dm.setup("fit")
    assert _epoch_rows(dm) == sorted(
        _rows(load_split(params.paths.prepared, dm.manifest, "train")[0])
    )


# --------------------------------------------------------------------------- streaming


def _datamodule(params: Params, workers: int = 0, seed: int | None = None) -> ConvDataModule:
    return ConvDataModule(
        params.paths.prepared,
        params.paths.augmented,
        32,
        workers,
        False,
        params.base.seed if seed is None else seed,
        batch_transform="device",  # uint8 batches: the images as stored
        resident=False,
    )


def _epoch(dm: ConvDataModule) -> list[str]:
    loader = dm.train_dataloader()
    out = []
    for images, _ in loader:
        out += _rows(images.numpy())
    return out


def _epoch_rows(dm: ConvDataModule) -> list[str]:
    return sorted(_epoch(dm))


def test_an_epoch_streams_every_training_image_once_prepared_and_augmented(both):
    params = both["litdata"]
    dm = _datamodule(params)
    dm.setup("fit")
    manifest = dm.manifest
    expected = _rows(load_split(params.paths.prepared, manifest, "train")[0])
    expected += _rows(load_split(params.paths.augmented, dm.augmented, "train")[0])
    seen = _epoch(dm)
    assert len(seen) == dm.train_size == len(expected)
    assert sorted(seen) == sorted(expected)


def test_each_epoch_its_own_order_the_same_for_the_same_seed(both):
    params = both["litdata"]
    dm = _datamodule(params)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[r for images, _ in loader for r in _rows(images.numpy())] for _ in range(2)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    again = _datamodule(params)
    again.setup("fit")
    assert _epoch(again) == epochs[0]
    other = _datamodule(params, seed=7)
    other.setup("fit")
    assert _epoch(other) != epochs[0]


def test_dataloader_workers_share_the_epoch_without_repeats(both):
    one, two = _datamodule(both["litdata"]), _datamodule(both["litdata"], workers=2)
    one.setup("fit")
    two.setup("fit")
    # a multiset: an augmented copy that drew no transform equals its original
    assert _epoch_rows(two) == _epoch_rows(one) and len(_epoch(two)) == two.train_size


def test_a_loader_restored_part_way_serves_the_rest_of_that_epoch_then_the_next(both):
    dm = _datamodule(both["litdata"])
    dm.setup("fit")
    reference = dm.train_dataloader()
    first, second = ([_rows(x.numpy()) for x, _ in reference] for _ in range(2))
    loader = dm.train_dataloader()
    batches = iter(loader)
    done = [_rows(next(batches)[0].numpy()) for _ in range(7)]
    state = loader.state_dict()
    resumed = _datamodule(both["litdata"])
    resumed.setup("fit")
    restored = resumed.train_dataloader()
    restored.load_state_dict(state)
    rest = [_rows(x.numpy()) for x, _ in restored]
    assert done + rest == first
    assert [_rows(x.numpy()) for x, _ in restored] == second


def test_validation_and_test_batches_are_the_npy_ones(both):
    loaders = {}
    for fmt in ("npy", "litdata"):
        dm = _datamodule(both[fmt])
        dm.setup("fit")
        loaders[fmt] = [(x.numpy(), y.numpy()) for x, y in dm.val_dataloader()]
    for (xa, ya), (xb, yb) in zip(loaders["npy"], loaders["litdata"], strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_options_litdata_cannot_serve_are_refused_naming_the_key(both):
    params = both["litdata"]
    with pytest.raises(ConvpipeError, match=r"runtime\.resident"):
        ConvDataModule(
            params.paths.prepared, None, 32, 0, False, 0, batch_transform="device", resident=True
        )
    with pytest.raises(ConvpipeError, match=r"runtime\.stream_from is set"):
        ConvDataModule(
            both["npy"].paths.prepared,
            None,
            32,
            0,
            False,
            0,
            batch_transform="loader",
            resident=False,
            stream_from="s3://bucket/convpipe",
        )


def test_stream_from_reads_the_same_path_below_the_url(both):
    dm = ConvDataModule(
        both["litdata"].paths.prepared,
        None,
        32,
        0,
        False,
        0,
        batch_transform="loader",
        resident=False,
        stream_from="s3://bucket/team/",
    )
    where = dm.location(Path("data/prepared"), dm.manifest, "train")
    assert where == "s3://bucket/team/data/prepared/train"


def test_a_prepared_folder_that_lost_images_is_refused(both, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(both["litdata"].paths.prepared, copy)
    manifest = load_manifest(copy)
    index = json.loads((copy / "val" / INDEX).read_text())
    index["chunks"][0]["chunk_size"] -= 1
    (copy / "val" / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConvpipeError, match=r"split 'val' holds \d+ images and \d+ labels"):
        load_split(copy, manifest, "val")


# --------------------------------------------------------------------------- DDP


def _probe(
    raw: dict[str, Any], root: Path, images: int, devices: int, epochs: int
) -> tuple[list[dict[str, list[int]]], set[int]]:
    """Train ``tests/helpers/stream_probe.py`` on ``images`` numbered images in LitData.

    Returns:
        Per rank, the image numbers each epoch streamed; and the train split's numbers.
    """
    source = write_numbered_csv(root / "numbered.csv", images)
    params_file, params = factories.params_in(
        raw,
        root,
        data={"source": "csv", "path": str(source), "format": "litdata"},
        overrides={"data.csv.image_shape": [8, 8], "train.batch_size": 40},
    )
    factories.prepared(params)
    manifest = load_manifest(params.paths.prepared)
    train = load_split(params.paths.prepared, manifest, "train")[0]
    out = root / "seen"
    out.mkdir()
    script = ROOT / "tests/helpers/stream_probe.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(params_file), str(out), str(devices), str(epochs)],
        cwd=root,
        env=project_env(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    return ranks, set(image_number(np.asarray(train)).tolist())


@pytest.mark.slow
def test_two_ddp_processes_stream_disjoint_shards_every_image_once_an_epoch(raw_params, tmp_path):
    """Two CPU DDP processes (gloo) through Lightning: LitData gives each rank its own images."""
    # 4 classes of 258 images: 180 of each for training, 720 in all, 18 batches of 20 a rank
    ranks, train = _probe(raw_params, tmp_path, 4 * 258, devices=2, epochs=3)
    assert len(train) == 720
    orders = []
    for epoch in ("0", "1", "2"):
        a, b = (rank[epoch] for rank in ranks)
        assert len(a) == len(b) == 360  # equal steps: no rank waits at a collective
        assert not set(a) & set(b) and set(a + b) == train  # disjoint; every image, once
        orders.append(a + b)
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch


@pytest.mark.slow
def test_ddp_drops_the_last_partial_batch_of_each_rank(raw_params, tmp_path):
    """Sizes that do not divide: LitData drops < 1 batch a rank (npy's sampler pads)."""
    ranks, train = _probe(raw_params, tmp_path, 1000, devices=2, epochs=1)
    a, b = ranks[0]["0"], ranks[1]["0"]
    assert len(train) == 696 and len(a) == len(b) == 340  # 17 batches of 20 each
    assert not set(a) & set(b) and set(a + b) < train


def test_an_object_store_that_cannot_be_read_is_one_line_naming_the_key():
    with pytest.raises(ConvpipeError, match=r"cannot open the LitData split") as caught:
        open_split("s3://convpipe-no-such-bucket-4242/data/prepared/train")
    assert "runtime.stream_from" in str(caught.value)

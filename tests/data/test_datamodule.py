"""ConvDataModule over real prepared + augmented digits: batching, order, normalisation."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convpipe.config.schema import Params
from convpipe.data.augment import write_augmented
from convpipe.data.datamodule import EVAL_BATCH_SIZE, ConvDataModule
from convpipe.data.datasets import ArrayDataset
from convpipe.data.manifest import MANIFEST, load_manifest, load_split
from convpipe.data.prepare import write_prepared
from convpipe.data.sampling import ResumableSampler, TrainLoader, collate_batch
from convpipe.data.sources import open_source
from convpipe.errors import ConvpipeError
from convpipe.tracking.store import ENV_URI
from convpipe.training.run import train
from convpipe.training.trainer import check_batch_size
from tests.helpers import factories


def params_in(raw: dict[str, Any], root: Path, **overrides: Any) -> Params:
    """The shipped params with every path and the MLflow store under ``root``."""
    return factories.params_in(raw, root, mlflow_store=True, overrides=overrides)[1]


@pytest.fixture(scope="module")
def data(raw_params, tmp_path_factory) -> Params:
    """Prepared digits (70/15/15) and one augmented copy of the train split."""
    root = tmp_path_factory.mktemp("dm")
    params = params_in(raw_params, root)
    write_prepared(open_source(params.data), params.data, params.base.seed, params.paths.prepared)
    write_augmented(params)
    return params


def module(params: Params, batch_size: int | str = 64, augmented: bool = True) -> ConvDataModule:
    dm = ConvDataModule(
        params.paths.prepared,
        params.paths.augmented if augmented else None,
        batch_size,
        0,
        False,
        params.base.seed,
        batch_transform="loader",
        resident=False,
    )
    dm.setup("fit")
    return dm


def normalised(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """What the model must see: (x/255 - mean) / std per channel, as (N, C, H, W)."""
    scaled = x.astype(np.float64) / 255.0
    out = (scaled - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(out.transpose(0, 3, 1, 2).astype(np.float32))


def test_train_is_prepared_plus_augmented(data: Params) -> None:
    dm = module(data)
    prepared = load_manifest(data.paths.prepared)
    augmented = load_manifest(data.paths.augmented)
    n_prep = prepared.splits["train"].count
    n_aug = augmented.splits["train"].count
    assert n_aug == n_prep * data.augment.copies > 0
    assert dm.train_size == n_prep + n_aug == len(dm.datasets["train"])
    assert len(dm.datasets["val"]) == prepared.splits["val"].count
    assert len(dm.datasets["test"]) == prepared.splits["test"].count
    # the first n_prep training images are the prepared split, the rest the augmented copies
    px, py = load_split(data.paths.prepared, prepared, "train")
    ax, ay = load_split(data.paths.augmented, augmented, "train")
    x, y = dm.datasets["train"].__getitems__([0, n_prep - 1, n_prep, n_prep + n_aug - 1])  # type: ignore[attr-defined]
    expected = np.stack([px[0], px[n_prep - 1], ax[0], ax[n_aug - 1]])
    torch.testing.assert_close(x, normalised(expected, prepared.mean, prepared.std))
    assert y.tolist() == [py[0], py[n_prep - 1], ay[0], ay[n_aug - 1]]
    assert module(data, augmented=False).train_size == n_prep


def test_train_class_counts_add_the_augmented_copies(data: Params) -> None:
    dm = module(data)
    prepared = load_manifest(data.paths.prepared)
    _, py = load_split(data.paths.prepared, prepared, "train")
    _, ay = load_split(data.paths.augmented, load_manifest(data.paths.augmented), "train")
    labels = np.concatenate([np.asarray(py), np.asarray(ay)])
    expected = np.bincount(labels, minlength=prepared.num_classes).tolist()
    assert dm.train_class_counts() == expected and sum(expected) == dm.train_size
    assert (
        module(data, augmented=False).train_class_counts()
        == np.bincount(np.asarray(py), minlength=prepared.num_classes).tolist()
    )


@pytest.mark.parametrize("batch_size", [1, 64, "full"])
def test_batch_sizes(data: Params, batch_size: int | str) -> None:
    dm = module(data, batch_size)
    m = dm.train_size
    loader = dm.train_dataloader()
    expected = m if batch_size == "full" else int(batch_size)
    assert len(loader) == math.ceil(m / expected)
    x, y = next(iter(loader))
    assert x.shape == (expected, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (expected,) and y.dtype == torch.int64
    if batch_size == "full":
        # batch gradient descent: one batch per epoch holding every training image once
        batches = list(loader)
        assert len(batches) == 1
        folders = (data.paths.prepared, data.paths.augmented)
        labels = [load_split(path, load_manifest(path), "train")[1] for path in folders]
        assert sorted(batches[0][1].tolist()) == sorted(np.concatenate(labels).tolist())
        # evaluation batches do not depend on train.batch_size
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            assert len(loader) == math.ceil(len(loader.dataset) / EVAL_BATCH_SIZE)


def test_pure_sgd_sees_every_image_once_per_epoch(data: Params) -> None:
    dm = module(data, 1, augmented=False)
    labels = [int(y) for _, y in dm.train_dataloader()]
    assert len(labels) == dm.train_size
    train_y = dm.datasets["train"].y  # type: ignore[attr-defined]
    assert sorted(labels) == sorted(train_y.tolist())
    assert labels != train_y.tolist()  # shuffled


@pytest.mark.parametrize("augmented", [False, True])
def test_whole_batch_fetch_equals_per_item_in_order(data: Params, augmented: bool) -> None:
    dataset = module(data, augmented=augmented).datasets["train"]
    n = len(dataset)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    # unsorted, with duplicates, spanning both parts of the concatenation
    indices = [*rng.integers(0, n, 40).tolist(), n - 1, 0, n - 1, n // 2 + 1, n // 2]
    x, y = dataset.__getitems__(indices)  # type: ignore[attr-defined]
    items = [dataset[i] for i in indices]
    torch.testing.assert_close(x, torch.stack([item[0] for item in items]), rtol=0, atol=0)
    assert y.tolist() == [int(item[1]) for item in items]


def test_normalisation_uses_the_manifest_mean_and_std(data: Params, tmp_path: Path) -> None:
    manifest = load_manifest(data.paths.prepared)
    x, y = load_split(data.paths.prepared, manifest, "val")
    val = module(data).datasets["val"]
    got, labels = val.__getitems__(list(range(len(val))))  # type: ignore[attr-defined]
    torch.testing.assert_close(got, normalised(np.asarray(x), manifest.mean, manifest.std))
    assert labels.tolist() == y.tolist()
    # the manifest's statistics are those of the train split: it comes out standardised
    train = module(data, augmented=False).datasets["train"]
    tx, _ = train.__getitems__(list(range(len(train))))  # type: ignore[attr-defined]
    assert abs(float(tx.mean())) < 1e-4 and abs(float(tx.std()) - 1) < 1e-3
    # other statistics in the manifest change what the loader produces accordingly
    copied = tmp_path / "prepared"
    shutil.copytree(data.paths.prepared, copied)
    raw = json.loads((copied / MANIFEST).read_text())
    raw["mean"], raw["std"] = [0.5], [0.25]
    (copied / MANIFEST).write_text(json.dumps(raw))
    other = ConvDataModule(copied, None, 64, 0, False, 0, batch_transform="loader", resident=False)
    other.setup()
    got2, _ = other.datasets["val"].__getitems__([0, 1])  # type: ignore[attr-defined]
    torch.testing.assert_close(got2, normalised(np.asarray(x[:2]), [0.5], [0.25]))


def test_val_and_test_are_in_order_and_train_is_seeded(data: Params) -> None:
    dm = module(data, 32)
    manifest = dm.manifest
    for split, loader in (("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        _, y = load_split(data.paths.prepared, manifest, split)
        first = torch.cat([b[1] for b in loader()]).tolist()
        assert first == y.tolist()
        assert torch.cat([b[1] for b in loader()]).tolist() == first

    def first_epoch(seed: int) -> list[int]:
        other = ConvDataModule(
            data.paths.prepared,
            data.paths.augmented,
            32,
            0,
            False,
            seed,
            batch_transform="loader",
            resident=False,
        )
        other.setup()
        return torch.cat([b[1] for b in other.train_dataloader()]).tolist()

    epoch = first_epoch(data.base.seed)
    assert epoch == first_epoch(data.base.seed)  # same seed, same order
    assert epoch != first_epoch(data.base.seed + 1)
    loader = dm.train_dataloader()
    one = torch.cat([b[1] for b in loader]).tolist()
    assert torch.cat([b[1] for b in loader]).tolist() == one  # a function of (seed, epoch)
    loader.sampler.set_epoch(1)  # as Lightning does before every epoch
    two = torch.cat([b[1] for b in loader]).tolist()
    assert one != two and sorted(one) == sorted(two)  # reshuffled every epoch


def test_a_resumed_sampler_continues_the_epoch_where_it_stopped() -> None:
    data = list(range(50))
    sampler = ResumableSampler(data, world=1, rank=0, seed=3)  # type: ignore[arg-type]
    sampler.set_epoch(2)
    epoch = list(sampler)
    sampler.resume_at(2, 20)
    assert list(sampler) == epoch[20:]  # the rest of the epoch, in its order
    assert list(sampler) == epoch and len(sampler) == 50  # only once; full length
    sampler.resume_at(1, 20)
    assert list(sampler) == epoch  # a state from another epoch is ignored


def test_the_train_loader_saves_trained_batches_not_fetched_ones(data: Params) -> None:
    dataset = module(data).datasets["train"]

    def loader(trained: int) -> TrainLoader:
        sampler = ResumableSampler(dataset, world=1, rank=0, seed=3)
        sampler.set_epoch(4)
        return TrainLoader(dataset, sampler, 32, lambda: trained, collate_fn=collate_batch)

    whole = [y for _, y in loader(0)]
    state = loader(3).state_dict()  # 3 trained, whatever the workers fetched ahead
    assert state == {"epoch": 4, "batches": 3}
    resumed = loader(0)
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert len(rest) == len(whole) - 3
    for got, want in zip(rest, whole[3:], strict=True):
        assert torch.equal(got, want)


def test_online_augmentation_only_on_the_training_side_and_only_when_asked(data: Params) -> None:
    online = ConvDataModule(
        data.paths.prepared,
        data.paths.augmented,
        32,
        0,
        True,
        0,
        batch_transform="loader",
        resident=False,
    )
    offline = ConvDataModule(
        data.paths.prepared,
        data.paths.augmented,
        32,
        0,
        False,
        0,
        batch_transform="loader",
        resident=False,
    )
    assert online.transform(train=True).augmentation is not None
    assert online.transform(train=False).augmentation is None  # evaluation never augments
    assert offline.transform(train=True).augmentation is None  # augment.online: false


def test_item_access_returns_one_image_and_an_int64_label(data: Params) -> None:
    manifest = load_manifest(data.paths.prepared)
    x, y = load_split(data.paths.prepared, manifest, "test")
    ds = ArrayDataset(x, y.astype(np.int32), module(data).transform(train=False))
    image, label = ds[3]
    assert image.shape == (1, 8, 8) and label.dtype == torch.int64 and int(label) == y[3]


def test_check_batch_size(make_params) -> None:
    check_batch_size(make_params(**{"train.batch_size": 100}).train, 100)
    check_batch_size(make_params(**{"train.batch_size": "full"}).train, 3)
    with pytest.raises(ConvpipeError) as info:
        check_batch_size(make_params(**{"train.batch_size": 101}).train, 100)
    line = info.value.line()
    assert "train.batch_size is 101" in line and "100 images" in line and "full" in line


def test_train_refuses_a_batch_larger_than_the_train_split(
    data: Params, raw_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_URI, raising=False)
    m = module(data).train_size
    params = params_in(raw_params, tmp_path, **{"train.batch_size": m + 1})
    params = params.model_copy(
        update={
            "paths": params.paths.model_copy(
                update={"prepared": data.paths.prepared, "augmented": data.paths.augmented}
            )
        }
    )
    start = time.monotonic()
    with pytest.raises(ConvpipeError, match=rf"batch_size is {m + 1} .* {m} images"):
        train(params)
    assert time.monotonic() - start < 5
    # refused before anything was tracked or written
    assert not (tmp_path / "mlflow.db").exists()
    assert not Path(params.paths.model).exists() and not Path(params.paths.checkpoints).exists()


def test_augmented_data_must_match_the_prepared_data(data: Params, tmp_path: Path) -> None:
    copied = tmp_path / "augmented"
    shutil.copytree(data.paths.augmented, copied)
    raw = json.loads((copied / MANIFEST).read_text())
    raw["image_size"] = [16, 16]
    (copied / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ConvpipeError, match=r"augmented data has image_size \(16, 16\)"):
        ConvDataModule(
            data.paths.prepared, copied, 64, 0, False, 0, batch_transform="loader", resident=False
        )
    with pytest.raises(ConvpipeError, match=r"no manifest\.json"):
        ConvDataModule(
            data.paths.prepared,
            tmp_path / "missing",
            64,
            0,
            False,
            0,
            batch_transform="loader",
            resident=False,
        )


def placed(params: Params, placement: str, online: bool = True) -> ConvDataModule:
    """A DataModule that transforms in the loader, on the device, or keeps the data resident."""
    resident = placement == "resident"
    return ConvDataModule(
        params.paths.prepared,
        params.paths.augmented,
        32,
        0,
        online,
        params.base.seed,
        batch_transform="device" if resident else placement,  # type: ignore[arg-type]
        resident=resident,
    )


def test_device_placement_serves_uint8_or_indices_and_auto_stays_in_the_loader_on_cpu(
    data: Params,
) -> None:
    by_placement = {}
    for placement in ("auto", "loader", "device", "resident"):
        dm = placed(data, placement)
        dm.setup("fit")  # no Trainer: auto cannot see a GPU, so it keeps the CPU's loader path
        by_placement[placement] = (dm.on_device, dm.datasets["train"].__getitems__([5, 2]))
    for placement in ("auto", "loader"):
        on_device, (x, _) = by_placement[placement]
        assert not on_device and x.dtype == torch.float32 and x.shape == (2, 1, 8, 8)
    on_device, (x, y) = by_placement["device"]
    assert on_device and x.dtype == torch.uint8 and x.shape == (2, 8, 8, 1)
    on_device, (index, y_resident) = by_placement["resident"]
    assert on_device and index.tolist() == [5, 2] and torch.equal(y, y_resident)


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_every_placement_trains_and_tests_to_the_same_numbers(data: Params, tmp_path: Path) -> None:
    """Loader, device and resident paths feed identical batches (online augmentation on)."""
    from tests.helpers.models import classifier, quiet_trainer

    results = {}
    for placement in ("loader", "device", "resident"):
        torch.manual_seed(0)
        model = classifier(data, num_classes=10, channels=1)
        dm = placed(data, placement)
        trainer = quiet_trainer(
            tmp_path, accelerator="cpu", max_epochs=2, limit_train_batches=6, deterministic=True
        )
        trainer.fit(model, datamodule=dm)
        (tested,) = trainer.test(model, datamodule=dm, verbose=False)
        assert dm.on_device == (placement != "loader")
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        results[placement] = (weights, tested)
    weights, tested = results["loader"]
    assert tested["test/loss"] > 0
    for placement in ("device", "resident"):
        other_weights, other_tested = results[placement]
        assert other_tested == tested, placement
        for key, value in weights.items():
            assert torch.equal(value, other_weights[key]), (placement, key)

"""The pure parts of prepare: stratified split, geometry, channel statistics."""

from __future__ import annotations

import numpy as np
import pytest

from convpipe.data.prepare import ChannelStats, resolve_geometry, stratified_split
from convpipe.data.raw import ImageInfo
from convpipe.errors import ConvpipeError

NAMES = ["a", "b", "c"]


def _labels():
    return np.repeat(np.arange(3), [100, 60, 40])


def test_split_is_a_partition_with_class_proportions():
    labels = _labels()
    parts = stratified_split(labels, {"val": 0.15, "test": 0.2}, seed=0, class_names=NAMES)
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(labels.size))
    for cls, n in enumerate([100, 60, 40]):
        assert (labels[parts["test"]] == cls).sum() == round(n * 0.2)
        assert (labels[parts["val"]] == cls).sum() == round(n * 0.15)
        assert (labels[parts["train"]] == cls).sum() == n - round(n * 0.2) - round(n * 0.15)


def test_split_is_seeded():
    labels = _labels()
    one = stratified_split(labels, {"val": 0.1, "test": 0.1}, seed=7, class_names=NAMES)
    two = stratified_split(labels, {"val": 0.1, "test": 0.1}, seed=7, class_names=NAMES)
    other = stratified_split(labels, {"val": 0.1, "test": 0.1}, seed=8, class_names=NAMES)
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not np.array_equal(one["test"], other["test"])


def test_small_class_gets_one_per_split():
    labels = np.array([0] * 50 + [1] * 3)
    parts = stratified_split(labels, {"val": 0.1, "test": 0.1}, seed=0, class_names=["a", "b"])
    for name in ("train", "val", "test"):
        assert (labels[parts[name]] == 1).sum() == 1


def test_class_too_small_to_stratify_names_it():
    labels = np.array([0] * 50 + [1] * 2)
    with pytest.raises(ConvpipeError, match=r"class 'b' has 2 image"):
        stratified_split(labels, {"val": 0.1, "test": 0.1}, seed=0, class_names=["a", "b"])


def test_geometry_auto_channels_and_native_size():
    gray = [ImageInfo(8, 8, "L"), ImageInfo(8, 8, "I;16")]
    assert resolve_geometry(gray, "auto", None) == (1, (8, 8))
    assert resolve_geometry([*gray, ImageInfo(8, 8, "RGB")], "auto", None) == (3, (8, 8))
    assert resolve_geometry(gray, 3, (4, 6)) == (3, (4, 6))


def test_geometry_mixed_sizes_need_image_size():
    infos = [ImageInfo(8, 8, "L"), ImageInfo(10, 12, "L")]
    with pytest.raises(ConvpipeError, match=r"set data\.image_size"):
        resolve_geometry(infos, "auto", None)
    assert resolve_geometry(infos, "auto", (9, 9)) == (1, (9, 9))


def test_channel_stats_match_numpy_in_chunks():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 5, 4, 3), dtype=np.uint8)
    stats = ChannelStats(3)
    for start in range(0, 37, 10):
        stats.update(images[start : start + 10])
    mean, std = stats.result()
    scaled = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, scaled.std(axis=0), rtol=1e-8)


def test_channel_stats_constant_images_do_not_divide_by_zero():
    stats = ChannelStats(1)
    stats.update(np.full((4, 2, 2, 1), 7, dtype=np.uint8))
    _, std = stats.result()
    assert std[0] > 0

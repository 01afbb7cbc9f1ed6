"""inference/trained.py: the one check of a checkpoint against prepared data, and loading."""

from __future__ import annotations

import pytest

from convpipe.data.manifest import Manifest, SkippedInfo
from convpipe.errors import ConvpipeError
from convpipe.inference.trained import check_matches
from tests.helpers.models import HW, classifier, tiny_model


def manifest(names: list[str], channels: int = 1, size: tuple[int, int] = HW) -> Manifest:
    """A manifest of ``names`` classes of ``channels x size`` images (no split on disk)."""
    return Manifest(
        format_version=1,
        stage="prepare",
        source="digits",
        class_names=names,
        num_classes=len(names),
        channels=channels,
        image_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        splits={},
        skipped=SkippedInfo(count=0, report=""),
        content_hash="sha256:0",
    )


def named(params, names: list[str] | None, num_classes: int = 3):
    model = classifier(params, num_classes=num_classes, model=tiny_model(params))
    model.hparams["class_names"] = names
    return model


def test_the_same_geometry_and_classes_pass(params) -> None:
    check_matches(named(params, ["a", "b", "c"]), manifest(["a", "b", "c"]), "here")


def test_a_checkpoint_without_names_is_checked_by_count(params) -> None:
    check_matches(named(params, None), manifest(["x", "y", "z"]), "here")
    with pytest.raises(ConvpipeError) as info:
        check_matches(named(params, None), manifest(["x", "y"]), "at m.ckpt and data")
    assert str(info.value) == (
        "the checkpoint's 3 classes are not the prepared data's 2 classes (x, y), "
        "at m.ckpt and data, re-run `dvc repro` so model and prepared data match"
    )


@pytest.mark.parametrize(
    ("names", "data", "said"),
    [
        (["a", "b", "c"], ["a", "c", "b"], "3 classes (a, b, c) are not the prepared data's 3"),
        (["a", "b", "c"], ["a", "b", "d"], "(a, b, c) are not the prepared data's 3 classes (a,"),
    ],
    ids=["reordered", "renamed"],
)
def test_the_same_count_with_other_names_is_refused(params, names, data, said) -> None:
    with pytest.raises(ConvpipeError, match=r"checkpoint's") as info:
        check_matches(named(params, names), manifest(data), "here")
    assert said in str(info.value)


@pytest.mark.parametrize(
    ("channels", "size", "said"),
    [(3, HW, "trained on 1x8x8 images but the prepared data is 3x8x8"),
     (1, (16, 16), "trained on 1x8x8 images but the prepared data is 1x16x16")],
    ids=["channels", "size"],
)  # fmt: skip
def test_another_geometry_is_refused(params, channels, size, said) -> None:
    with pytest.raises(ConvpipeError, match=said):
        check_matches(named(params, ["a", "b", "c"]), manifest(["a", "b", "c"], channels, size), "")

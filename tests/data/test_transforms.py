"""Fast tests of the transforms (convpipe.data.transforms)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

# Imported before convpipe.data.transforms here: skip albumentations' PyPI version check too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from convpipe.config.schema import AugmentParams, load_params
from convpipe.data.transforms.apply import augment_batches
from convpipe.data.transforms.batched import tensor_augmentation
from convpipe.data.transforms.factory import (
    SECTIONS,
    build_augmentation,
    load_augmentation,
    save_augmentation,
    seed_augmentation,
)
from convpipe.data.transforms.normalize import BatchTransform, normalize_batch
from convpipe.data.transforms.preview import (
    PREVIEW_GAP,
    PREVIEW_HEADER,
    PREVIEW_MIN_TILE,
    preview_grid,
    preview_scale,
    save_png,
)
from convpipe.data.transforms.trivial import TrivialAugmentWide
from convpipe.errors import ConvpipeError
from tests.helpers.project import ROOT

# Every section present and disabled; tests switch on what they need.
OFF: dict[str, Any] = {
    "copies": 1,
    "online": False,
    "preview_count": 4,
    "crop": {"p": 0.0, "padding": 2, "border": "constant"},
    "resized_crop": {"p": 0.0, "scale": [0.5, 0.9], "ratio": [0.8, 1.25]},
    "affine": {"p": 0.0, "shift": 0.1, "scale": [0.9, 1.1], "rotate": 10.0},
    "rotate": {"p": 0.0, "limit": 15.0},
    "horizontal_flip": {"p": 0.0},
    "vertical_flip": {"p": 0.0},
    "trivial_augment": {"p": 0.0},
    "color_jitter": {"p": 0.0, "brightness": 0.3, "contrast": 0.3, "saturation": 0.0, "hue": 0.0},
    "gaussian_noise": {"p": 0.0, "std": [0.02, 0.05]},
    "erasing": {"p": 0.0, "scale": [0.02, 0.33], "ratio": [0.3, 3.3], "fill": "random"},
}

EXPECTED_CLASS = {
    "crop": A.Sequential,
    "resized_crop": A.RandomResizedCrop,
    "affine": A.Affine,
    "rotate": A.Rotate,
    "horizontal_flip": A.HorizontalFlip,
    "vertical_flip": A.VerticalFlip,
    "trivial_augment": TrivialAugmentWide,
    "color_jitter": A.ColorJitter,
    "gaussian_noise": A.GaussNoise,
    "erasing": A.Erasing,
}

HW = (12, 10)


def make_params(**sections: dict[str, Any]) -> AugmentParams:
    """OFF with the given sections' keys overridden."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in OFF.items()}
    for name, update in sections.items():
        raw[name].update(update)
    return AugmentParams.model_validate(raw)


def make_images(n: int = 6, channels: int = 1, hw: tuple[int, int] = HW) -> np.ndarray:
    return np.random.default_rng(123).integers(0, 256, (n, *hw, channels), dtype=np.uint8)


def run(pipeline: A.Compose, images: np.ndarray, copies: int = 1) -> np.ndarray:
    return np.concatenate(list(augment_batches(images, pipeline, copies, chunk_size=4)))


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("section", SECTIONS)
def test_each_section_alone_changes_images_and_keeps_shape(section: str, channels: int) -> None:
    params = make_params(**{section: {"p": 1.0}})
    pipeline = build_augmentation(params, HW, channels, seed=0)
    assert [type(t) for t in pipeline.transforms] == [EXPECTED_CLASS[section]]
    images = make_images(channels=channels)
    out = run(pipeline, images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert any(not np.array_equal(a, b) for a, b in zip(images, out, strict=True))


def test_p_zero_leaves_sections_out_of_the_compose() -> None:
    pipeline = build_augmentation(make_params(), HW, 3, seed=0)
    assert len(pipeline.transforms) == 0
    images = make_images(channels=3)
    np.testing.assert_array_equal(run(pipeline, images), images)

    two = make_params(affine={"p": 0.5}, gaussian_noise={"p": 0.2})
    classes = [type(t) for t in build_augmentation(two, HW, 3, seed=0).transforms]
    assert classes == [A.Affine, A.GaussNoise]


def test_crop_pads_and_crops_back_as_one_unit() -> None:
    pipeline = build_augmentation(make_params(crop={"p": 0.4, "padding": 3}), HW, 1, seed=0)
    (unit,) = pipeline.transforms
    assert unit.p == 0.4
    pad, crop = unit.transforms
    assert pad.padding == 3
    assert (crop.height, crop.width) == HW
    # Padding is black and the crop window moves over the padded canvas.
    white = np.full((1, *HW, 1), 255, dtype=np.uint8)
    always = build_augmentation(make_params(crop={"p": 1.0, "padding": 3}), HW, 1, seed=0)
    out = run(always, np.repeat(white, 20, axis=0))
    assert out.shape == (20, *HW, 1) and (out == 0).any() and (out == 255).any()


@pytest.mark.parametrize("key", ["saturation", "hue"])
def test_colour_keys_on_grayscale_are_a_clear_user_error(key: str) -> None:
    params = make_params(color_jitter={"p": 0.5, key: 0.1})
    with pytest.raises(ConvpipeError) as info:
        build_augmentation(params, HW, 1, seed=0)
    message = str(info.value)
    assert f"augment.color_jitter.{key}=0.1" in message
    assert "1 channel" in message
    assert "data.channels: 3" in message
    # Meaningful for RGB, and irrelevant while the section is off.
    build_augmentation(params, HW, 3, seed=0)
    build_augmentation(make_params(color_jitter={"p": 0.0, key: 0.1}), HW, 1, seed=0)


def test_grayscale_colour_jitter_scales_brightness_multiplicatively() -> None:
    params = make_params(color_jitter={"p": 1.0, "brightness": 0.5, "contrast": 0.0})
    pipeline = build_augmentation(params, HW, 1, seed=3)
    image = np.full((1, *HW, 1), 100, dtype=np.uint8)
    out = run(pipeline, image)
    # One factor per image in [0.5, 1.5], applied to every pixel: a flat image stays flat.
    assert out.shape == image.shape and np.unique(out).size == 1
    assert 50 <= int(out[0, 0, 0, 0]) <= 150


def test_invalid_range_names_the_section() -> None:
    params = make_params(resized_crop={"p": 1.0, "scale": [0.9, 0.5]})
    with pytest.raises(ConvpipeError) as info:
        build_augmentation(params, HW, 3, seed=0)
    assert "augment.resized_crop is invalid: scale: First value should be less" in str(info.value)


def test_shipped_params_build_for_grayscale_and_rgb() -> None:
    augment = load_params(ROOT / "params.yaml").augment
    for channels in (1, 3):
        pipeline = build_augmentation(augment, (8, 8), channels, seed=1)
        images = make_images(channels=channels, hw=(8, 8))
        assert run(pipeline, images, copies=2).shape == (12, 8, 8, channels)


# --------------------------------------------------------------------------- seeding

ALL_ON = {
    "crop": {"p": 0.5},
    "affine": {"p": 0.5},
    "horizontal_flip": {"p": 0.5},
    "color_jitter": {"p": 0.5, "saturation": 0.2, "hue": 0.05},
    "gaussian_noise": {"p": 0.5},
}


def test_same_seed_is_byte_identical_and_different_seed_differs() -> None:
    params = make_params(**ALL_ON)
    images = make_images(n=10, channels=3)
    first = run(build_augmentation(params, HW, 3, seed=11), images, copies=2)
    second = run(build_augmentation(params, HW, 3, seed=11), images, copies=2)
    other = run(build_augmentation(params, HW, 3, seed=12), images, copies=2)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


@pytest.mark.subprocess
def test_same_seed_is_byte_identical_across_processes() -> None:
    script = (
        "import hashlib, numpy as np\n"
        "from convpipe.data.transforms.factory import build_augmentation\n"
        "from tests.data.test_transforms import ALL_ON, HW, make_images, make_params, run\n"
        "p = build_augmentation(make_params(**ALL_ON), HW, 3, seed=11)\n"
        "print(hashlib.sha256(run(p, make_images(n=10, channels=3)).tobytes()).hexdigest())\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    here = run(build_augmentation(make_params(**ALL_ON), HW, 3, seed=11), make_images(10, 3))
    assert child.stdout.strip() == hashlib.sha256(here.tobytes()).hexdigest()


def test_sections_draw_independently() -> None:
    # A.Compose(seed=...) alone gives both flips the same stream, so they always fire together.
    params = make_params(horizontal_flip={"p": 0.5}, vertical_flip={"p": 0.5})
    image = make_images(n=1)
    out = run(build_augmentation(params, HW, 1, seed=0), np.repeat(image, 64, axis=0))
    h_only = [np.array_equal(o, image[0][:, ::-1]) for o in out]
    v_only = [np.array_equal(o, image[0][::-1]) for o in out]
    assert any(h_only) and any(v_only)


# --------------------------------------------------------------------------- serialisation


@pytest.mark.filterwarnings("error")  # albumentations warns on keys it cannot reload
def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    params = make_params(**ALL_ON, rotate={"p": 0.3}, resized_crop={"p": 0.3})
    target = tmp_path / "out" / "pipeline.json"
    save_augmentation(build_augmentation(params, HW, 3, seed=5), target)
    assert json.loads(target.read_text())["transform"]["__class_fullname__"] == "Compose"
    assert [p.name for p in target.parent.iterdir()] == ["pipeline.json"]  # no temp files

    images = make_images(n=10, channels=3)
    fresh = run(build_augmentation(params, HW, 3, seed=5), images, copies=2)
    loaded = run(load_augmentation(target, seed=5), images, copies=2)
    assert fresh.tobytes() == loaded.tobytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # albumentations' own note on a bad file
def test_load_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConvpipeError, match="not found"):
        load_augmentation(tmp_path / "missing.json", seed=0)
    bad = tmp_path / "bad.json"
    for text in ('{"transform": {"__class_fullname__": "NoSuchTransform"}}', "{not json", "[]"):
        bad.write_text(text)
        with pytest.raises(ConvpipeError, match="dvc repro augment"):
            load_augmentation(bad, seed=0)
    bad.write_text(json.dumps(A.to_dict(A.HorizontalFlip())))
    with pytest.raises(ConvpipeError, match="expected an albumentations Compose"):
        load_augmentation(bad, seed=0)


# --------------------------------------------------------------------------- augment_batches


def test_augment_batches_order_length_and_chunking() -> None:
    images = make_images(n=5, channels=1)
    labels = np.arange(5)
    chunks = list(augment_batches(images, build_augmentation(make_params(), HW, 1, 0), 3, 4))
    assert [len(c) for c in chunks] == [4, 4, 4, 3]
    out = np.concatenate(chunks)
    # Copy-major order: output row k comes from images[k % N], so labels tile.
    np.testing.assert_array_equal(out, np.concatenate([images] * 3))
    np.testing.assert_array_equal(np.tile(labels, 3)[[0, 5, 7, 14]], [0, 0, 2, 4])


def test_augment_batches_pairs_each_output_with_its_source() -> None:
    images = make_images(n=5, channels=3)
    pipeline = build_augmentation(make_params(horizontal_flip={"p": 1.0}), HW, 3, seed=0)
    out = np.concatenate(list(augment_batches(images, pipeline, copies=2, chunk_size=3)))
    np.testing.assert_array_equal(out, np.tile(images[:, :, ::-1], (2, 1, 1, 1)))


def test_augment_batches_does_not_depend_on_chunk_size_and_reads_memmaps(tmp_path: Path) -> None:
    params = make_params(**ALL_ON)
    images = make_images(n=7, channels=3)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    small = list(augment_batches(mapped, build_augmentation(params, HW, 3, 9), 2, 1))
    large = list(augment_batches(images, build_augmentation(params, HW, 3, 9), 2, 100))
    assert len(small) == 14 and len(large) == 1
    np.testing.assert_array_equal(np.concatenate(small), large[0])


def test_augment_batches_edge_cases() -> None:
    pipeline = build_augmentation(make_params(), HW, 1, seed=0)
    assert list(augment_batches(make_images(), pipeline, copies=0, chunk_size=4)) == []
    with pytest.raises(ValueError):
        next(augment_batches(make_images(), pipeline, copies=1, chunk_size=0))
    with pytest.raises(ValueError):
        next(augment_batches(make_images()[..., 0], pipeline, copies=1, chunk_size=4))


# --------------------------------------------------------------------------- previews


@pytest.mark.parametrize("channels", [1, 3])
def test_preview_grid_layout_and_original_column(channels: int) -> None:
    originals = make_images(n=3, channels=channels, hw=(8, 8))
    augmented = [255 - originals, originals // 2]
    grid = preview_grid(originals, augmented, headers=False)
    scale = preview_scale((8, 8))
    tile, gap = 8 * scale, PREVIEW_GAP
    assert scale * 8 >= PREVIEW_MIN_TILE
    assert grid.shape == (3 * tile + 4 * gap, 3 * tile + 4 * gap, 3)
    assert grid.dtype == np.uint8
    for row in range(3):
        y = gap + row * (tile + gap)
        up = np.repeat(np.repeat(originals[row], scale, 0), scale, 1)
        expected = np.broadcast_to(up, (tile, tile, 3))
        np.testing.assert_array_equal(grid[y : y + tile, gap : gap + tile], expected)
        second = grid[y : y + tile, 2 * gap + tile : 2 * gap + 2 * tile]
        np.testing.assert_array_equal(second, np.broadcast_to(255 - up, (tile, tile, 3)))


def test_preview_grid_headers_only_add_a_band_on_top() -> None:
    originals = make_images(n=2, channels=3, hw=(32, 32))
    plain = preview_grid(originals, [originals])
    assert plain.shape[0] == preview_grid(originals, [originals], headers=False).shape[0] + 16
    assert (plain[:PREVIEW_HEADER] < 128).any()  # some dark text was drawn
    np.testing.assert_array_equal(
        plain[PREVIEW_HEADER:], preview_grid(originals, [originals], headers=False)
    )


def test_preview_grid_rejects_mismatched_columns() -> None:
    with pytest.raises(ValueError, match=r"augmented\[0\]"):
        preview_grid(make_images(n=2), [make_images(n=3)])


def test_save_png_round_trip(tmp_path: Path) -> None:
    grid = preview_grid(make_images(n=2, hw=(8, 8)), [make_images(n=2, hw=(8, 8))])
    target = tmp_path / "reports" / "augment_preview.png"
    save_png(grid, target)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), grid)
    save_png(make_images(n=1)[0], tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"


# --------------------------------------------------------------------------- model input


def test_normalize_batch_by_hand() -> None:
    images = torch.tensor([[[[0], [255]], [[51], [102]]]], dtype=torch.uint8)  # (1, 2, 2, 1)
    out = normalize_batch(images, mean=[0.5], std=[0.25])
    expected = torch.tensor([[[[-2.0, 2.0], [-1.2, -0.4]]]])  # (x/255 - 0.5) / 0.25
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected)


def test_normalize_batch_is_per_channel() -> None:
    images = torch.zeros((2, 3, 4, 3), dtype=torch.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 0, 51
    out = normalize_batch(images, mean=[0.0, 0.5, 0.2], std=[1.0, 0.5, 0.1])
    assert out.shape == (2, 3, 3, 4)
    torch.testing.assert_close(out[:, 0], torch.full((2, 3, 4), 1.0))
    torch.testing.assert_close(out[:, 1], torch.full((2, 3, 4), -1.0))
    torch.testing.assert_close(out[:, 2], torch.zeros((2, 3, 4)))
    with pytest.raises(ValueError):
        normalize_batch(images, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError):
        normalize_batch(images.float(), mean=[0.5] * 3, std=[0.5] * 3)


def test_batch_transform_train_and_eval_sides() -> None:
    images = make_images(n=4, channels=1)
    flip = build_augmentation(make_params(horizontal_flip={"p": 1.0}), HW, 1, seed=0)
    train = BatchTransform(flip, [0.5], [0.5], seed=0)
    evaluate = BatchTransform(None, [0.5], [0.5], seed=0)
    assert train.train and not evaluate.train
    as_tensor = torch.from_numpy(images)
    expected_eval = normalize_batch(as_tensor, [0.5], [0.5])
    torch.testing.assert_close(evaluate(as_tensor), expected_eval)
    torch.testing.assert_close(evaluate(images), expected_eval)  # numpy input too
    flipped = normalize_batch(torch.from_numpy(images[:, :, ::-1].copy()), [0.5], [0.5])
    torch.testing.assert_close(train(as_tensor), flipped)


def test_batch_transform_reseeds_once_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    noise = make_params(gaussian_noise={"p": 1.0})
    images = torch.from_numpy(make_images(n=2, channels=3))

    def in_worker(worker_seed: int) -> list[torch.Tensor]:
        pipeline = build_augmentation(noise, HW, 3, seed=1)
        transform = BatchTransform(pipeline, [0.5] * 3, [0.5] * 3, seed=1)
        info = types.SimpleNamespace(seed=worker_seed, id=0)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        return [transform(images), transform(images)]

    worker_a, worker_b, worker_a_again = in_worker(100), in_worker(101), in_worker(100)
    assert not torch.equal(worker_a[0], worker_b[0])  # workers do not replay one stream
    assert not torch.equal(worker_a[0], worker_a[1])  # the stream continues within a worker
    torch.testing.assert_close(worker_a, worker_a_again, rtol=0, atol=0)  # and is seeded


# --------------------------------------------------------------------------- batched online path

#: The shipped-like ranges of every section, each applied to half of the images.
EVERY_SECTION = {
    "crop": {"p": 0.5, "padding": 2},
    "resized_crop": {"p": 0.5},
    "affine": {"p": 0.5, "shift": 0.15, "scale": [0.8, 1.2], "rotate": 20.0},
    "rotate": {"p": 0.5, "limit": 30.0},
    "horizontal_flip": {"p": 0.5},
    "vertical_flip": {"p": 0.5},
    "trivial_augment": {"p": 0.5},
    "color_jitter": {"p": 0.5, "brightness": 0.4, "contrast": 0.4},
    "gaussian_noise": {"p": 0.5},
    "erasing": {"p": 0.5, "scale": [0.05, 0.4], "ratio": [0.5, 2.0]},
}


def structured_image(channels: int, hw: tuple[int, int] = (16, 20)) -> np.ndarray:
    """One uint8 ``(H, W, C)`` image with a bright off-centre block on a gradient."""
    height, width = hw
    image = np.add.outer(np.arange(height) * 4, np.arange(width) * 2).astype(np.float64)
    image[3:9, 4:15] = 230
    planes = [image, image[::-1] * 0.7, 255 - image][:channels]
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)


def both_paths(pipeline: A.Compose, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(albumentations per image, batched tensor path) outputs as float ``(N, H, W, C)``."""
    per_image = run(pipeline, images).astype(np.float64)
    batched = tensor_augmentation(pipeline, seed=0)
    assert batched is not None
    tensor = batched(torch.from_numpy(images)).permute(0, 2, 3, 1).numpy().astype(np.float64)
    return per_image, tensor


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("section", SECTIONS)
def test_batched_path_draws_from_the_same_distribution(section: str, channels: int) -> None:
    settings = dict(EVERY_SECTION[section])
    if section == "color_jitter" and channels == 3:
        settings.update(saturation=0.5, hue=0.2)
    pipeline = build_augmentation(make_params(**{section: settings}), (16, 20), channels, 0)
    # TrivialAugment spreads its copies over 14 ops, some of them (32-pixel shifts) far-reaching
    copies = 20_000 if section == "trivial_augment" else 3000
    images = np.repeat(structured_image(channels)[None], copies, axis=0)
    per_image, batched = both_paths(pipeline, images)
    # Per pixel, the mean and spread over 3,000 augmented copies of one image agree within
    # sampling noise (and albumentations' uint8 rounding after every step).
    assert np.abs(per_image.mean(0) - batched.mean(0)).mean() < 2.0
    assert np.abs(per_image.std(0) - batched.std(0)).mean() < 2.0
    assert abs(per_image.mean() - batched.mean()) < 1.5
    assert batched.min() >= 0 and batched.max() <= 255


@pytest.mark.parametrize(
    "transform",
    [
        A.Affine(translate_px=(3, 3), scale=(0.7, 0.7), rotate=(25, 25), p=1.0),
        A.Affine(translate_percent=(-0.2, -0.2), scale={"x": 1.3, "y": 0.8}, p=1.0),
        A.Rotate(limit=(-35, -35), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
        A.HorizontalFlip(p=1.0),
        A.VerticalFlip(p=1.0),
    ],
    ids=["affine-zoom-rotate", "affine-shift-aspect", "rotate", "hflip", "vflip"],
)
def test_batched_geometry_matches_albumentations_image_for_image(transform: Any) -> None:
    # Fixed parameters: the only difference left is OpenCV's 1/32-pixel interpolation grid.
    pipeline = A.Compose([transform], seed=0)
    images = np.stack([structured_image(3), structured_image(3)[::-1]])
    per_image, batched = both_paths(pipeline, images)
    assert np.abs(per_image - batched).mean() < 1.0
    assert np.abs(per_image - batched).max() <= 16


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` (H, W) moved by whole pixels, black where nothing moved in."""
    out = np.zeros_like(image)
    height, width = image.shape
    out[max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)] = image[
        max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)
    ]
    return out


def test_batched_crop_is_a_whole_pixel_shift_with_black_borders() -> None:
    pipeline = build_augmentation(make_params(crop={"p": 1.0, "padding": 2}), HW, 1, seed=0)
    batched = tensor_augmentation(pipeline, seed=4)
    assert batched is not None
    image = make_images(n=1)
    out = batched(torch.from_numpy(np.repeat(image, 200, axis=0)))[:, 0].numpy()
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    candidates = {o: shifted(image[0, :, :, 0].astype(np.float32), *o) for o in offsets}
    seen = set()
    for result in out:
        matches = [o for o, c in candidates.items() if np.allclose(result, c, atol=1e-3)]
        assert matches, "an output is not a whole-pixel shift of the input"
        seen.add(matches[0])
    assert seen == set(offsets)  # every position of the 5x5 crop window occurs


def test_reflect_border_crops_shift_the_mirrored_image_on_both_paths() -> None:
    pipeline = build_augmentation(
        make_params(crop={"p": 1.0, "padding": 2, "border": "reflect"}), HW, 1, seed=0
    )
    batched = tensor_augmentation(pipeline, seed=4)
    assert batched is not None, "reflect crops must run batched, not fall back per image"
    image = make_images(n=1)
    many = np.repeat(image, 200, axis=0)
    mirrored = np.pad(image[0, :, :, 0], 2, mode="symmetric").astype(np.float32)  # dcba|abcd
    height, width = HW
    candidates = {
        (dy, dx): mirrored[dy : dy + height, dx : dx + width] for dy in range(5) for dx in range(5)
    }
    outputs = {
        "batched": batched(torch.from_numpy(many))[:, 0].numpy(),
        "per image": run(pipeline, many)[:, :, :, 0].astype(np.float32),
    }
    for path, out in outputs.items():
        seen = set()
        for result in out:
            matches = [o for o, c in candidates.items() if np.allclose(result, c, atol=1e-3)]
            assert matches, f"{path}: an output is not a shift of the mirrored image"
            seen.add(matches[0])
        assert seen == set(candidates), path  # every window position, none black-bordered


def test_batched_path_is_seeded_and_restarts_on_reseed() -> None:
    pipeline = build_augmentation(make_params(**ALL_ON), HW, 3, seed=0)
    images = torch.from_numpy(make_images(n=16, channels=3))
    first, second, other = (tensor_augmentation(pipeline, s) for s in (7, 7, 8))
    assert first is not None and second is not None and other is not None
    a = first(images)
    torch.testing.assert_close(a, second(images), rtol=0, atol=0)
    assert not torch.equal(a, other(images))
    assert not torch.equal(a, first(images))  # the stream moves on
    first.reseed(7)
    torch.testing.assert_close(first(images), a, rtol=0, atol=0)


def test_batched_path_keeps_the_thread_count() -> None:
    batched = tensor_augmentation(build_augmentation(make_params(**ALL_ON), HW, 3, 0), 0)
    assert batched is not None
    before = torch.get_num_threads()
    batched(torch.from_numpy(make_images(channels=3)))
    assert torch.get_num_threads() == before


def test_the_shipped_pipeline_runs_batched_online() -> None:
    pipeline = build_augmentation(load_params(ROOT / "params.yaml").augment, (28, 28), 1, seed=0)
    transform = BatchTransform(pipeline, [0.1], [0.3], seed=0)
    assert transform.batched is not None
    out = transform(make_images(n=8, hw=(28, 28)))
    assert out.shape == (8, 1, 28, 28) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "unsupported",
    [
        A.Blur(p=1.0),
        A.Affine(shear=(10, 10), p=1.0),
        A.Rotate(limit=10, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
        A.Affine(scale=(0.8, 1.2), interpolation=cv2.INTER_CUBIC, p=1.0),
    ],
    ids=["other-transform", "shear", "reflect-border", "cubic"],
)
def test_pipelines_the_batched_path_lacks_run_per_image(unsupported: Any) -> None:
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), unsupported], seed=3)
    assert tensor_augmentation(pipeline, seed=0) is None
    transform = BatchTransform(pipeline, [0.5], [0.5], seed=0)
    assert transform.batched is None and transform.train
    images = make_images(n=4)
    seed_augmentation(pipeline, 9)
    out = transform(images)
    seed_augmentation(pipeline, 9)
    expected = normalize_batch(torch.from_numpy(run(pipeline, images)), [0.5], [0.5])
    torch.testing.assert_close(out, expected)


def test_per_image_path_on_request_matches_albumentations() -> None:
    pipeline = build_augmentation(make_params(**ALL_ON), HW, 3, seed=2)
    transform = BatchTransform(pipeline, [0.5] * 3, [0.5] * 3, seed=2, batched=False)
    assert transform.batched is None
    images = make_images(n=6, channels=3)
    out = transform(images)
    expected = run(build_augmentation(make_params(**ALL_ON), HW, 3, seed=2), images)
    torch.testing.assert_close(
        out, normalize_batch(torch.from_numpy(expected), [0.5] * 3, [0.5] * 3)
    )


@pytest.mark.parametrize("batched", [False, True])
def test_black_erasing_blanks_one_rectangle_on_both_paths(batched: bool) -> None:
    params = make_params(
        erasing={"p": 1.0, "scale": [0.1, 0.3], "ratio": [0.5, 2.0], "fill": "black"}
    )
    pipeline = build_augmentation(params, (16, 20), 1, seed=0)
    images = np.full((200, 16, 20, 1), 200, np.uint8)
    if batched:
        augmentation = tensor_augmentation(pipeline, seed=0)
        assert augmentation is not None
        out = augmentation(torch.from_numpy(images)).permute(0, 2, 3, 1).numpy()
    else:
        out = run(pipeline, images)
    fractions = []
    for image in out[..., 0]:
        rows, cols = np.nonzero(image == 0)
        assert rows.size > 0 and set(np.unique(image)) <= {0, 200}
        box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box == 0).all()  # exactly one filled rectangle
        fractions.append(rows.size / image.size)
    assert min(fractions) >= 0.1 - 0.02 and max(fractions) <= 0.3 + 0.03

"""TrivialAugment Wide: each op against PIL's own, both paths alike, the draws uniform."""

from __future__ import annotations

import collections

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from convpipe.data.transforms.factory import seed_augmentation
from convpipe.data.transforms.trivial import BINS, OPS, TrivialAugmentWide, apply_op

NAMES = list(OPS)


def _photo(channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(20, 230, (12, 14, channels), dtype=np.uint8)


def _one(image: np.ndarray, name: str, strength_bin: int, negative: bool = False) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    op = torch.tensor([NAMES.index(name)])
    out = apply_op(x, op, torch.tensor([strength_bin]), torch.tensor([negative]))
    return out[0].permute(1, 2, 0).round().numpy()


# posterize (bin 0: 8 bits), solarize (threshold 255), autocontrast and equalize have no zero
ZERO_AT_BIN_0 = [n for n in NAMES if n not in ("posterize", "solarize", "autocontrast", "equalize")]


@pytest.mark.parametrize("name", ZERO_AT_BIN_0)
def test_the_weakest_strength_of_every_signed_or_enhancing_op_changes_nothing(name) -> None:
    image = _photo()
    np.testing.assert_allclose(_one(image, name, 0), image, atol=0.5)


def test_posterize_and_solarize_follow_torchvisions_tables() -> None:
    bits = [OPS["posterize"][1](torch.tensor(float(b))).item() for b in range(BINS)]
    assert bits[0] == 8 and bits[-1] == 2 and sorted(bits, reverse=True) == bits
    assert OPS["solarize"][1](torch.tensor(0.0)).item() == 255.0
    assert OPS["solarize"][1](torch.tensor(30.0)).item() == 0.0
    image = _photo()
    assert (_one(image, "solarize", 30) == 255 - image).all()  # threshold 0: all inverted
    assert (_one(image, "posterize", 30) % 64 == 0).all()  # 2 bits


@pytest.mark.parametrize(
    ("name", "pil"),
    [
        ("equalize", ImageOps.equalize),
        ("autocontrast", ImageOps.autocontrast),
        ("sharpness", lambda im: ImageEnhance.Sharpness(im).enhance(1.99)),
        ("brightness", lambda im: ImageEnhance.Brightness(im).enhance(1.99)),
    ],
)
def test_ops_match_pil(name, pil) -> None:
    image = _photo()
    expected = np.asarray(pil(Image.fromarray(image))).astype(np.float64)
    got = _one(image, name, BINS - 1)
    assert np.abs(got - expected).max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_per_image_and_batched_paths_apply_the_same_op(name, channels) -> None:
    image = _photo(channels)
    transform = TrivialAugmentWide(p=1.0)
    index = NAMES.index(name)
    per_image = transform.apply(image, op=index, strength_bin=17, negative=True)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    batched = apply_op(
        x, torch.tensor([index] * 2), torch.tensor([17] * 2), torch.tensor([True] * 2)
    )
    assert np.abs(per_image - batched[1].permute(1, 2, 0).numpy()).max() <= 0.5


def test_the_per_image_path_draws_every_op_uniformly_from_the_seeded_stream() -> None:
    seen: collections.Counter[int] = collections.Counter()
    pipeline = A.Compose([TrivialAugmentWide(p=1.0)], seed=0)
    seed_augmentation(pipeline, 0)
    transform = pipeline.transforms[0]
    draws = [transform.get_params() for _ in range(2800)]
    seen.update(d["op"] for d in draws)
    assert set(seen) == set(range(len(NAMES)))
    assert max(seen.values()) < 2 * min(seen.values())
    seed_augmentation(pipeline, 0)
    assert [transform.get_params() for _ in range(5)] == draws[:5]

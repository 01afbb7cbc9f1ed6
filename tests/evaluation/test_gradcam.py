"""Grad-CAM: the heat map lies where the evidence for the class is, in plain and residual nets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from convpipe.config.schema import ModelParams
from convpipe.evaluation.gradcam import grad_cam
from convpipe.evaluation.plots import plot_misclassified
from tests.helpers.models import (
    QUIET_LIGHTNING,
    TINY_CONV,
    TINY_RESIDUAL,
    classifier,
    model_section,
    quiet_trainer,
)

pytestmark = QUIET_LIGHTNING

#: Where each class's bright 2x2 patch sits in the 8x8 image (row, column of its corner).
CORNERS = {0: (1, 1), 1: (1, 5), 2: (5, 3)}


def _patches(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 8x8 images whose class is given only by where a bright patch is."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        r, c = CORNERS[label]
        images[i, 0, r : r + 2, c : c + 2] += 3.0
    return images, labels


def _in_patch(cam: torch.Tensor, label: int) -> float:
    """The share of the map's mass in the class's patch, grown by a pixel each way."""
    r, c = CORNERS[label]
    return float(
        cam[max(r - 1, 0) : r + 3, max(c - 1, 0) : c + 3].sum() / cam.sum().clamp_min(1e-9)
    )


def test_the_map_of_the_chosen_class_lies_on_its_evidence(params, tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier(params, num_classes=3)
    x, y = _patches(300, seed=1)
    quiet_trainer(tmp_path, max_epochs=30).fit(model, DataLoader(TensorDataset(x, y), 32))
    test_x, test_y = _patches(30, seed=2)
    with torch.no_grad():
        assert (model.eval()(test_x).argmax(1) == test_y).float().mean() > 0.9  # it learnt
    model.zero_grad(set_to_none=True)  # what training left
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cams = grad_cam(model, test_x, test_y)
    assert cams.shape == (30, 8, 8) and cams.min() >= 0 and cams.max() <= 1
    pairs = list(zip(cams, test_y.tolist(), strict=True))
    shares = [_in_patch(cam, label) for cam, label in pairs]
    # the 4x4 window around the patch is a quarter of the image: a flat map puts 0.25 there
    assert sum(shares) / len(shares) > 0.4, shares
    # and more there than around any other class's patch, for nearly every image
    own_first = [
        all(_in_patch(cam, label) > _in_patch(cam, other) for other in CORNERS if other != label)
        for cam, label in pairs
    ]
    assert sum(own_first) >= 27, own_first
    # the map follows the class asked about: another class's map lies elsewhere
    other = grad_cam(model, test_x[:1], torch.tensor([1]))  # test_x[0] is class 0
    assert _in_patch(other[0], 0) < _in_patch(cams[0], 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    fig = plot_misclassified(
        (test_x[:4, 0, :, :, None].clamp(0, 1) * 255).byte().numpy(),
        test_y[:4].tolist(),
        test_y[:4].tolist(),
        [0.9] * 4,
        ["a", "b", "c"],
        heat=cams[:4].numpy(),
    )
    assert fig.texts[0].get_text().startswith("Grad-CAM of the predicted class")


@pytest.mark.parametrize("num_classes", [2, 5])
def test_residual_networks_and_the_single_logit_of_two_classes(params, num_classes) -> None:
    model = classifier(params, num_classes=num_classes, model=ModelParams(**TINY_RESIDUAL))
    images = torch.randn(3, 1, 8, 8)
    cams = grad_cam(model, images, torch.tensor([0, 1, 1]))
    assert cams.shape == (3, 8, 8) and torch.isfinite(cams).all()
    assert ((cams.flatten(1).amax(1) == 1) | (cams.flatten(1).amax(1) == 0)).all()


def test_a_network_pooled_to_one_pixel_is_mapped_where_it_still_has_extent(
    params, tmp_path
) -> None:
    # three 2x2 poolings take 8x8 to 1x1: the last block's output has one pixel to weigh
    conv = [{**TINY_CONV[0], "filters": 8}] * 3
    model = classifier(params, num_classes=3, model=ModelParams(**model_section(conv, [], 0.0)))
    torch.manual_seed(0)
    x, y = _patches(300, seed=1)
    quiet_trainer(tmp_path, max_epochs=30).fit(model, DataLoader(TensorDataset(x, y), 32))
    test_x, test_y = _patches(30, seed=2)
    cams = grad_cam(model, test_x, test_y)
    spread = cams.flatten(1).amax(1) - cams.flatten(1).amin(1)
    # maps, not one flat colour each (the 1x1 output of the last pooling gave exactly that)
    assert (spread > 0.5).float().mean() > 0.9, spread

"""What a training cost: one image's training FLOPs, counted without touching the training."""

from __future__ import annotations

import torch

from convpipe.models.shapes import layer_shapes
from convpipe.training.cost import training_flops_per_image
from tests.helpers.models import HW, classifier


def test_counting_touches_neither_the_model_nor_the_random_state(params) -> None:
    """A resumed training counts after its random state is restored: it must draw the same."""
    model = classifier(params, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops = training_flops_per_image(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    forward = sum(row.flops for row in layer_shapes(model.model_params, 1, HW, 3))
    assert 2.0 * forward < flops < 4.0 * forward  # forward, then about twice that backward

"""Mixup, CutMix and class-weighted losses: what they do to a batch and to the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from convpipe.errors import ConvpipeError
from convpipe.models.mixing import mix_batch
from tests.helpers.models import QUIET_LIGHTNING, classifier, tiny_model, trainer

pytestmark = QUIET_LIGHTNING


def _constant_images(n: int = 6, hw: int = 16) -> torch.Tensor:
    """Image i is filled with the value i: which image a pixel came from is its value."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, hw, hw).clone()


def test_without_alphas_the_batch_is_untouched() -> None:
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed = mix_batch(x, y, 0.0, 0.0)
    assert mixed.x is x and mixed.lam == 1.0 and torch.equal(mixed.y_b, y)


def test_mixup_blends_each_image_with_the_reversed_batch() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    mixed = mix_batch(x, y, 0.4, 0.0)
    assert 0.0 < mixed.lam < 1.0
    torch.testing.assert_close(mixed.x, mixed.lam * x + (1 - mixed.lam) * x.flip(0))
    assert torch.equal(mixed.y_a, y) and torch.equal(mixed.y_b, y.flip(0))


def test_cutmix_pastes_one_box_and_lam_is_the_area_kept() -> None:
    torch.manual_seed(5)
    x = _constant_images()
    for _ in range(20):
        mixed = mix_batch(x, torch.arange(6), 0.0, 1.0)
        for i in range(6):
            own = mixed.x[i] == i
            partner = mixed.x[i] == 5 - i
            assert bool((own | partner).all())  # no blending, only pasting
            if i != 5 - i:
                assert float(own.float().mean()) == pytest.approx(mixed.lam, abs=1e-6)


def test_with_both_each_batch_gets_one_of_them_and_both_happen() -> None:
    torch.manual_seed(0)
    x = _constant_images()
    kinds = set()
    for _ in range(40):
        mixed = mix_batch(x, torch.arange(6), 0.4, 1.0)
        pasted = bool(((mixed.x[0] == 0) | (mixed.x[0] == 5)).all())
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_the_draws_follow_torchs_seed() -> None:
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    torch.manual_seed(11)
    first = mix_batch(x, y, 0.4, 1.0)
    torch.manual_seed(11)
    again = mix_batch(x, y, 0.4, 1.0)
    assert first.lam == again.lam and torch.equal(first.x, again.x)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_mixed_loss_is_the_loss_of_the_mixed_soft_target(make_params, num_classes, smoothing):
    torch.manual_seed(0)
    module = classifier(make_params(), num_classes=num_classes)
    logits = torch.randn(6, num_classes) if num_classes > 2 else torch.randn(6)
    y_a = torch.randint(0, num_classes, (6,))
    y_b = y_a.flip(0)
    lam = 0.3
    loss = lam * module.data_loss(logits, y_a, smoothing) + (1 - lam) * module.data_loss(
        logits, y_b, smoothing
    )
    if num_classes == 2:
        target = lam * y_a.float() + (1 - lam) * y_b.float()
        expected = F.binary_cross_entropy_with_logits(
            logits, target * (1 - smoothing) + smoothing / 2
        )
    else:

        def soft(y: torch.Tensor) -> torch.Tensor:
            return F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes

        expected = F.cross_entropy(logits, lam * soft(y_a) + (1 - lam) * soft(y_b))
    torch.testing.assert_close(loss, expected)


def test_mixing_changes_what_a_training_step_minimises(make_params) -> None:
    params = make_params()
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    losses = []
    for alphas in ({}, {"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        torch.manual_seed(0)
        module = classifier(params, model=tiny_model(params, dropout=0.0), **alphas)
        if not alphas:  # the plain arm's first loss is the plain batch's, before the step
            module.train()
            plain = float(module.data_loss(module(x), y).detach())
        run = trainer(max_steps=1)
        run.fit(module, data)
        losses.append(float(run.callback_metrics["train/loss"]))
    assert losses[0] == pytest.approx(plain, rel=1e-5)
    assert losses[0] != pytest.approx(losses[1]) and losses[0] != pytest.approx(losses[2])


# --------------------------------------------------------------------------- class weights


def test_balanced_weights_are_m_over_k_times_the_class_count(make_params) -> None:
    module = classifier(make_params(), num_classes=3, class_weights="balanced")
    module.set_class_counts([6, 2, 4])
    torch.testing.assert_close(module.class_weights, torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    plain = classifier(make_params(), num_classes=3)
    plain.set_class_counts([6, 2, 4])
    assert plain.class_weights is None


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_weighted_loss_is_the_weighted_mean(make_params, num_classes) -> None:
    module = classifier(make_params(), num_classes=num_classes, class_weights="balanced")
    module.set_class_counts([6, 2, 4][:num_classes])
    torch.manual_seed(0)
    logits = torch.randn(8, num_classes) if num_classes > 2 else torch.randn(8)
    y = torch.randint(0, num_classes, (8,))
    weights = module.class_weights
    if num_classes == 2:
        each = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
        expected = (each * weights[y]).sum() / weights[y].sum()
    else:
        expected = F.cross_entropy(logits, y, weight=weights)
    torch.testing.assert_close(module.data_loss(logits, y, weighted=True), expected)
    # validation and test losses stay unweighted
    assert not torch.allclose(module.data_loss(logits, y), expected)


def test_balanced_weights_need_every_class(make_params) -> None:
    module = classifier(make_params(), num_classes=3, class_weights="balanced")
    with pytest.raises(ConvpipeError, match="needs images of every class"):
        module.set_class_counts([5, 0, 3])

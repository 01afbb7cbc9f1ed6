"""Each training technique of params.yaml does what it says (and not nothing).

Label smoothing, batch-norm momentum/eps, activations, the learning rate per sample, the
bias/batch-norm learning-rate scale, warmup schedules, the EMA of the weights and
test-time augmentation.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import AveragedModel

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.inference.predict import predict_logits
from convpipe.models.checkpoint import load_model, read_checkpoint
from convpipe.models.module import CNNClassifier
from convpipe.models.network import build_cnn, regularization_penalty
from convpipe.models.optim import budget_epochs, build_optimizer, build_scheduler, warmup_decay
from convpipe.models.tta import tta_logits, tta_views
from convpipe.models.whitening import whitening_filters
from convpipe.training.callbacks import EMAWeights, ema_decay_at, weight_averaging
from tests.helpers.models import (
    HW,
    QUIET_LIGHTNING,
    block,
    classifier,
    loader,
    model_variant,
    tiny_model,
    train_variant,
    trainer,
)

pytestmark = [*QUIET_LIGHTNING, pytest.mark.usefixtures("seeded")]


# --------------------------------------------------------------------------- label smoothing


def test_label_smoothing_moves_the_loss_by_the_closed_form_amount(params):
    module = classifier(params, num_classes=4)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    s = 0.2
    plain = F.cross_entropy(logits, y)
    uniform = -F.log_softmax(logits, dim=1).mean(dim=1).mean()  # CE against s / K each
    expected = (1 - s) * plain + s * uniform
    assert module.data_loss(logits, y, s) == pytest.approx(expected.item(), rel=1e-6)
    assert module.data_loss(logits, y) == pytest.approx(plain.item(), rel=1e-6)


def test_label_smoothing_of_the_sigmoid_unit_targets_s_over_two(params):
    module = classifier(params, num_classes=2)
    logits, y = torch.randn(6), torch.tensor([0, 1, 1, 0, 1, 0])
    s = 0.3
    both = (
        F.binary_cross_entropy_with_logits(logits, torch.zeros(6))
        + F.binary_cross_entropy_with_logits(logits, torch.ones(6))
    ) / 2
    plain = F.binary_cross_entropy_with_logits(logits, y.float())
    expected = (1 - s) * plain + s * both
    assert module.data_loss(logits, y, s) == pytest.approx(expected.item(), rel=1e-6)


def test_training_minimises_the_smoothed_loss_and_validation_reports_the_plain_one(params):
    model = tiny_model(params, dropout=0.0)
    module = classifier(params, model=model, label_smoothing=0.4, reg_type="none")
    data = loader(n=8)
    x, y = next(iter(data))
    start = copy.deepcopy(module).train()
    with torch.no_grad():
        smoothed = start.data_loss(start(x), y, 0.4).item()
        plain = start.data_loss(start(x), y).item()
    fitted = trainer(max_steps=1, max_epochs=1, limit_val_batches=0)
    fitted.fit(module, data)
    assert fitted.callback_metrics["train/loss"].item() == pytest.approx(smoothed, rel=1e-5)
    assert smoothed != pytest.approx(plain, rel=1e-3)


# --------------------------------------------------------------------------- network options


def test_batch_norm_takes_momentum_and_eps_from_params(params):
    model = tiny_model(params, batch_norm_momentum=0.6, batch_norm_eps=1e-3)
    net = build_cnn(model, 1, HW, 3)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.6 and m.eps == 1e-3 for m in norms)
    x = torch.randn(4, 1, *HW) * 3 + 2
    net.train()
    net(x)
    with torch.no_grad():
        batch_mean = net.features[0].conv(x).mean(dim=(0, 2, 3))
    # running = (1 - momentum) * 0 + momentum * batch mean
    assert torch.allclose(norms[0].running_mean, 0.6 * batch_mean, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "layer"), [("silu", nn.SiLU), ("mish", nn.Mish), ("hardswish", nn.Hardswish)]
)
def test_the_common_activations_are_built(params, name, layer):
    conv = [block(params, filters=4, activation=name)]
    net = build_cnn(model_variant(params, conv=conv, hidden=[8]), 1, HW, 3)
    assert isinstance(net.features[0].act, layer)
    assert net(torch.randn(2, 1, *HW)).shape == (2, 3)


def test_a_fixed_batch_norm_scale_stays_one_while_the_shift_trains(params):
    model = tiny_model(params, batch_norm_scale=False)
    net = build_cnn(model, 1, HW, 3)
    bn = net.features[0].bn
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    optimizer = build_optimizer(net, train_variant(params, optimizer="sgd", lr=0.5), 8)
    F.cross_entropy(net(torch.randn(8, 1, *HW)), torch.arange(8) % 3).backward()
    optimizer.step()
    assert torch.equal(bn.weight, torch.ones(4)) and not torch.equal(bn.bias, torch.zeros(4))
    learnt = build_cnn(tiny_model(params), 1, HW, 3).features[0].bn
    assert learnt.weight.requires_grad  # the shipped default learns it


def test_max_pooling_before_the_norm_gives_the_same_block_output_for_relu(params):
    conv = [block(params, filters=4, activation="relu", pool="max", pool_size=2)]
    after = build_cnn(model_variant(params, conv=conv, hidden=[8]), 1, HW, 3)
    before = build_cnn(
        model_variant(params, conv=conv, hidden=[8], pool_before_norm=True), 1, HW, 3
    )
    assert list(before.features[0]._modules) == ["conv", "pool", "bn", "act"]
    assert list(after.features[0]._modules) == ["conv", "bn", "act", "pool"]
    with torch.no_grad():  # a positive scale and shift: BN is increasing per channel
        after.features[0].bn.weight.uniform_(0.5, 2.0)
        after.features[0].bn.running_var.uniform_(0.5, 2.0)
        after.features[0].bn.running_mean.normal_()
    before.load_state_dict(after.state_dict())  # the same parameters under the same names
    x = torch.randn(4, 1, *HW)
    after.eval()
    before.eval()
    torch.testing.assert_close(before.features(x), after.features(x))
    # the norm sees a quarter of the pixels: what makes the option faster
    seen: list[tuple[int, ...]] = []
    before.features[0].bn.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    before(x)
    assert seen == [(4, 4, HW[0] // 2, HW[1] // 2)]


def test_dirac_init_makes_each_conv_start_as_the_identity_on_its_first_channels(params):
    conv = [block(params, filters=4, batch_norm=False, pool="none"), block(params, filters=6)]
    net = build_cnn(model_variant(params, conv=conv, hidden=[8], conv_init="dirac"), 1, HW, 3)
    first, second = net.features[0].conv, net.features[1].conv
    x = torch.randn(2, 1, *HW)
    with torch.no_grad():
        out = first(x) - first.bias[:, None, None]
        torch.testing.assert_close(out[:, :1], x)  # filter 0 passes channel 0 through
        h = torch.randn(2, 4, *HW)
        torch.testing.assert_close(second(h)[:, :4], h)  # no bias under batch norm
    assert second.weight[4:].abs().sum() > 0  # the filters past C_in keep torch's init
    default = build_cnn(model_variant(params, conv=conv, hidden=[8]), 1, HW, 3)
    assert not torch.allclose(default.features[1].conv(h)[:, :4], h)


def test_output_scale_multiplies_the_logits_exactly(params):
    plain = build_cnn(tiny_model(params), 1, HW, 3)
    scaled = build_cnn(tiny_model(params, output_scale=1 / 9), 1, HW, 3)
    scaled.load_state_dict(plain.state_dict())  # no parameter of its own
    plain.eval()
    scaled.eval()
    x = torch.randn(4, 1, *HW)
    torch.testing.assert_close(scaled(x), plain(x) / 9)
    assert "scale" not in plain.classifier._modules  # 1.0 adds no layer


# --------------------------------------------------------------------------- optimiser


def test_learning_rate_per_sample_scales_with_the_global_batch(params):
    net = build_cnn(tiny_model(params), 1, HW, 3)
    per_batch = build_optimizer(net, train_variant(params, lr=0.01, lr_unit="batch"), 64)
    per_sample = build_optimizer(net, train_variant(params, lr=0.01, lr_unit="sample"), 64)
    assert [g["lr"] for g in per_batch.param_groups] == [0.01]
    assert [g["lr"] for g in per_sample.param_groups] == [pytest.approx(0.64)]


def test_biases_and_batch_norm_get_their_own_learning_rate(params):
    net = build_cnn(tiny_model(params), 1, HW, 3)
    train = train_variant(params, optimizer="nesterov", lr=0.1, norm_bias_lr_scale=64.0)
    optimizer = build_optimizer(net, train, 32)
    weights, others = optimizer.param_groups
    assert (weights["name"], others["name"]) == ("weights", "norm_bias")
    assert weights["lr"] == 0.1 and others["lr"] == pytest.approx(6.4)
    assert all(p.ndim > 1 for p in weights["params"])
    bn = net.features[0].bn
    expected = {id(p) for p in net.parameters() if p.ndim == 1}
    assert {id(p) for p in others["params"]} == expected and id(bn.weight) in expected
    assert weights["nesterov"] and weights["momentum"] == train.momentum
    scheduled = build_scheduler(optimizer, train.model_copy(update={"scheduler": "onecycle"}), 10)
    assert scheduled is not None  # one-cycle peaks at each group's own rate
    assert scheduled["scheduler"].optimizer.param_groups[1]["max_lr"] == pytest.approx(6.4)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_rises_to_the_peak_then_decays_to_zero(params, shape):
    train = train_variant(
        params, optimizer="sgd", lr=0.1, scheduler=f"warmup_{shape}", max_epochs=5, warmup_epochs=1
    )
    optimizer = build_optimizer(nn.Linear(2, 2), train, 16)
    config = build_scheduler(optimizer, train, total_steps=20)
    assert config is not None and config["interval"] == "step"
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(20):
        optimizer.step()
        config["scheduler"].step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # 4 warmup steps (1 of 5 epochs)
    assert lrs[3:] == sorted(lrs[3:], reverse=True)
    assert lrs[20] == 0.0
    middle = 0.1 * warmup_decay(12, 4, 20, shape)
    assert lrs[12] == pytest.approx(middle)
    left = 8 / 16
    expected = left if shape == "linear" else 0.5 * (1 - math.cos(math.pi * left))
    assert middle == pytest.approx(0.1 * expected)


@pytest.mark.parametrize(
    ("images", "epochs"),
    [(300, 200), (5_000, 26), (30_000, 5), (64, 200)],
)
def test_a_step_budget_becomes_whole_epochs_for_any_data_size(params, images, epochs):
    # 2,000 steps of 64: 5 steps an epoch for 300 images (400 epochs, capped at 200); 79 for
    # 5,000 (25.3, rounded up); 469 for 30,000 (4.3, rounded up)
    train = train_variant(params, batch_size=64, max_epochs=200, max_steps=2000)
    assert budget_epochs(train, images) == epochs
    assert budget_epochs(train_variant(params, max_epochs=7), images) == 7  # no budget


def test_warmup_counts_real_epochs_under_a_step_budget(params):
    train = train_variant(
        params,
        optimizer="sgd",
        lr=0.1,
        scheduler="warmup_linear",
        warmup_epochs=1,
        max_epochs=200,
        max_steps=8,
    )
    optimizer = build_optimizer(nn.Linear(2, 2), train, 16)
    # the Trainer runs 2 epochs of 4 steps: warmup is 4 steps, not max_epochs' share of 8
    config = build_scheduler(optimizer, train, total_steps=8, steps_per_epoch=4)
    assert config is not None
    assert config["scheduler"].lr_lambdas[0](0) == pytest.approx(0.25)


def test_training_under_a_budget_ends_with_a_validation(params, tmp_path):
    from convpipe.training.run import resolved_train

    train = train_variant(params, max_epochs=50, max_steps=6, batch_size=8, precision="32-true")
    module = classifier(params, max_epochs=50, max_steps=6, batch_size=8)
    fake = params.model_copy(update={"train": train})
    cfg = resolved_train(fake, module, 32)  # 4 steps an epoch: 2 epochs
    assert cfg.max_epochs == 2
    fitted = trainer(max_steps=-1, max_epochs=cfg.max_epochs)
    fitted.fit(module, loader(n=32), loader(n=16))
    assert fitted.global_step == 8 and "val/loss" in fitted.callback_metrics


def test_a_step_budget_refuses_epoch_laid_schedules(params):
    with pytest.raises(ValueError, match=r"train\.max_steps 100 may cut short"):
        train_variant(params, scheduler="cosine", max_steps=100)


def test_warmup_longer_than_the_training_is_refused(params):
    with pytest.raises(ValueError, match=r"warmup_epochs must be below train\.max_epochs"):
        train_variant(params, scheduler="warmup_linear", max_epochs=3, warmup_epochs=3)


# --------------------------------------------------------------------------- EMA


def _fit_with_ema(params: Params, root: Path, decay: float) -> tuple[Path, object]:
    module = classifier(params, ema_decay=decay, optimizer="sgd", lr=0.5)
    best = ModelCheckpoint(dirpath=root, filename="best", monitor="val/loss")
    fitted = trainer(
        max_steps=-1,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[*weight_averaging(module.train_params), best],
        default_root_dir=root,
    )
    fitted.fit(module, loader(n=32), loader(n=16))
    return Path(best.best_model_path), fitted


def test_ema_weights_are_what_checkpoints_and_evaluation_use(params, tmp_path):
    path, fitted = _fit_with_ema(params, tmp_path, 0.9)
    assert any(isinstance(c, EMAWeights) for c in fitted.callbacks)
    checkpoint = read_checkpoint(path)
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    weight = "net.features.0.conv.weight"
    assert not torch.equal(ema[weight], raw[weight])  # the average lags the raw weights
    loaded = load_model(path)  # what evaluate, predict and export load
    assert torch.equal(loaded.state_dict()[weight], ema[weight])
    # testing the best checkpoint keeps the average (Lightning's callback would restore raw)
    test_data = loader(n=16)
    result = fitted.test(ckpt_path=str(path), dataloaders=test_data, verbose=False)[0]
    with torch.no_grad():
        logits = torch.cat([loaded(x) for x, _ in test_data])
    labels = torch.cat([y for _, y in test_data])
    assert result["test/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_ema_warms_up_so_the_initial_weights_do_not_linger():
    assert [round(ema_decay_at(0.99, n), 4) for n in (0, 1, 2)] == [0.1, 0.1818, 0.25]
    assert ema_decay_at(0.99, 10_000) == 0.99
    assert ema_decay_at(0.9, 80) == 0.9  # (1 + 80) / 90 = 0.9: from there on, the decay
    callback = EMAWeights(0.99)
    net = nn.Linear(2, 2)
    callback._average_model = AveragedModel(net, multi_avg_fn=callback._kwargs["multi_avg_fn"])
    averaged = callback._average_model
    averaged.update_parameters(net)  # the first update copies
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    averaged.update_parameters(net)  # one average so far: decay 2/11, 82 % of the way there
    assert torch.allclose(averaged.module.weight, start + 9 / 11, atol=1e-6)


def test_ema_averages_batch_norm_statistics_and_copies_its_count():
    callback = EMAWeights(0.5)
    norm = nn.BatchNorm1d(2)
    averaged = AveragedModel(norm, use_buffers=True, multi_avg_fn=callback._kwargs["multi_avg_fn"])
    averaged.update_parameters(norm)  # copies
    for _ in range(3):
        norm(torch.full((4, 2), 10.0) + torch.randn(4, 2))
        averaged.update_parameters(norm)
    assert int(averaged.module.num_batches_tracked) == int(norm.num_batches_tracked) == 3
    mean = averaged.module.running_mean
    assert torch.all(mean > 0) and not torch.allclose(mean, norm.running_mean)


def test_without_ema_no_average_is_kept(params, tmp_path):
    assert weight_averaging(train_variant(params, ema_decay=0.0)) == []
    path, _ = _fit_with_ema(params, tmp_path, 0.0)
    assert "current_model_state" not in read_checkpoint(path)


# --------------------------------------------------------------------------- TTA


class Asymmetric(nn.Module):
    """Logits that depend on where the pixels are: a mirror or a shift changes them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.linspace(-1, 1, 64).reshape(1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weight).sum(dim=(1, 2, 3))
        return torch.stack([score, -score, score**2], dim=1)


def test_tta_flip_averages_exactly_the_image_and_its_mirror():
    model, x = Asymmetric(), torch.randn(5, 1, 8, 8)
    expected = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(tta_logits(model, x, "flip"), expected, atol=1e-6)
    assert not torch.allclose(tta_logits(model, x, "flip"), model(x), atol=1e-3)
    assert torch.equal(tta_logits(model, x, "none"), model(x))


def test_tta_flip_translate_averages_six_views_shifted_by_one_pixel():
    model, x = Asymmetric(), torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    views = tta_views(x, "flip_translate")
    assert len(views) == 6
    up_left, down_right = views[2], views[4]
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])  # content moved up and left
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(up_left[..., -1, :-1], x[..., -2, 1:])  # the border is reflected
    assert torch.equal(views[3], up_left.flip(-1)) and torch.equal(views[5], down_right.flip(-1))
    expected = torch.stack([model(v) for v in views]).mean(dim=0)
    assert torch.allclose(tta_logits(model, x, "flip_translate"), expected, atol=1e-4)


def test_tta_translate_averages_three_views_and_never_mirrors():
    model, x = Asymmetric(), torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    views = tta_views(x, "translate")
    assert len(views) == 3
    shifted = tta_views(x, "flip_translate")
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], shifted[2]) and torch.equal(views[2], shifted[4])
    expected = torch.stack([model(v) for v in views]).mean(dim=0)
    assert torch.allclose(tta_logits(model, x, "translate"), expected, atol=1e-4)
    assert not torch.allclose(tta_logits(model, x, "translate"), model(x), atol=1e-3)


def test_predict_logits_applies_tta(params):
    module = classifier(params).eval()

    class Dataset:
        """predict_logits' protocol: batches read by index, then the transform (none here)."""

        transform = None

        def __init__(self) -> None:
            self.x = torch.randn(7, 1, *HW)

        def __len__(self) -> int:
            return 7

        def read(self, indices):
            return self.x[list(indices)], torch.zeros(len(indices), dtype=torch.long)

    data = Dataset()
    with torch.no_grad():
        expected = (module(data.x) + module(data.x.flip(-1))) / 2
    assert torch.allclose(predict_logits(module, data, 3, "flip"), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"evaluate\.tta must be one of"):
        tta_views(data.x, "rotate")


def test_unknown_tta_in_params_names_the_choices(make_params):
    with pytest.raises(ConvpipeError, match=r"evaluate\.tta"):
        make_params(**{"evaluate.tta": "mirror"})


# --------------------------------------------------------------------------- whitening


def _whiten_model(params: Params, channels: int = 3, kernel: int = 2):
    conv = [block(params, filters=2 * channels * kernel**2, kernel=kernel, padding="valid")]
    conv[0].update(batch_norm=False, activation="gelu", pool="none")
    return model_variant(params, conv=conv, hidden=[], dropout=0.0, whiten=True)


def test_whitening_filters_decorrelate_the_training_patches():
    torch.manual_seed(1)
    mix = torch.randn(3, 3)  # correlated channels, and neighbouring pixels alike
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 3, 9, 9))
    images = images + torch.roll(images, 1, dims=3)
    weight = whitening_filters(images, 2)
    assert weight.shape == (24, 3, 2, 2)
    assert torch.equal(weight[12:], -weight[:12])
    out = F.conv2d(images, weight[:12])  # (N, 12, 8, 8): one value per patch and filter
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    # diag(lambda / (lambda + eps)): the identity but for directions of tiny variance
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.02)


def test_whitening_needs_two_filters_per_patch_dimension(params):
    conv = [block(params, filters=16, kernel=2)]
    model = model_variant(params, conv=conv, whiten=True)
    with pytest.raises(ConvpipeError, match=r"model\.conv\[0\]\.filters = .* = 24"):
        build_cnn(model, 3, HW, 3)


def test_whitening_layer_is_fixed_and_unpenalised_but_kept_in_checkpoints(params, tmp_path):
    module = CNNClassifier(
        _whiten_model(params).model_dump(),
        train_variant(params, reg_type="l2", reg_lambda=10.0, optimizer="sgd", lr=0.5).model_dump(),
        3,
        HW,
        3,
        32,
    )
    images = torch.randn(16, 3, *HW)
    module.init_whitening(images)
    conv = module.net.features[0].conv
    set_to = conv.weight.detach().clone()
    assert torch.equal(set_to, whitening_filters(images, 2))
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    fitted = trainer(max_steps=4, max_epochs=1, limit_val_batches=0)
    fitted.fit(module, loader(n=32, channels=3))
    assert torch.equal(conv.weight, set_to)  # not trained
    assert all(p is not conv.weight for p in fitted.optimizers[0].param_groups[0]["params"])
    path = tmp_path / "whiten.ckpt"
    fitted.save_checkpoint(path)
    assert torch.equal(load_model(path).net.features[0].conv.weight, set_to)
    # the penalty leaves the fixed filters out
    without = regularization_penalty(module.net, "l2", 1.0, 1)
    trained = sum(m.weight.pow(2).sum() for m in module.net.modules() if isinstance(m, nn.Linear))
    assert without.item() == pytest.approx(float(trained), rel=1e-5)

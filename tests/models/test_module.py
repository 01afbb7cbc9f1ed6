"""Fast tests of the CNN builder, the lambda/m penalty and the CNNClassifier LightningModule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convpipe.errors import ConvpipeError
from convpipe.hardware import cpu_threads
from convpipe.models.module import CNNClassifier
from convpipe.models.network import (
    build_cnn,
    count_parameters,
    probabilities,
    regularization_penalty,
)
from convpipe.models.optim import build_optimizer, build_scheduler
from convpipe.models.shapes import conv_output_size, layer_shapes, output_units, same_padding
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


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(8, 3, 1, (1, 1)), (5, 3, 2, (1, 1)), (4, 3, 2, (0, 1)), (4, 2, 1, (0, 1)), (7, 1, 3, (0, 0))],
)
def test_same_padding_follows_tensorflow(size, kernel, stride, expected):
    before, after = same_padding(size, kernel, stride)
    assert (before, after) == expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


@pytest.mark.parametrize(
    ("hw", "update", "conv_hw", "out_hw"),
    [
        ((8, 8), {"padding": "same", "stride": 1, "pool": "none"}, (8, 8), (8, 8)),
        ((7, 9), {"padding": "same", "stride": 2, "pool": "none"}, (4, 5), (4, 5)),
        ((7, 9), {"padding": "same", "stride": 3, "kernel": 2, "pool": "none"}, (3, 3), (3, 3)),
        ((8, 7), {"padding": "same", "kernel": 4, "pool": "none"}, (8, 7), (8, 7)),
        ((8, 8), {"padding": "valid", "stride": 1, "pool": "none"}, (6, 6), (6, 6)),
        ((9, 10), {"padding": "valid", "stride": 2, "pool": "none"}, (4, 4), (4, 4)),
        ((8, 8), {"padding": "same", "pool": "max", "pool_size": 2}, (8, 8), (4, 4)),
        ((7, 7), {"padding": "same", "pool": "avg", "pool_size": 3}, (7, 7), (2, 2)),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_block_output_shapes(params, hw, update, conv_hw, out_hw, channels):
    model = model_variant(params, conv=[block(params, filters=5, **update)], hidden=[])
    rows = layer_shapes(model, channels, hw, 4)
    assert rows[0].shape == (5, *conv_hw)
    net = build_cnn(model, channels, hw, 4)
    out = net.features(torch.randn(2, channels, *hw))
    assert tuple(out.shape) == (2, 5, *out_hw)
    assert rows[1 if update["pool"] == "none" else 2].shape == (5 * out_hw[0] * out_hw[1],)
    assert tuple(net(torch.randn(2, channels, *hw)).shape) == (2, 4)


def test_valid_formula_and_asymmetric_same_pad(params):
    assert conv_output_size(9, 3, 2, "valid") == (9 - 3) // 2 + 1
    model = model_variant(params, conv=[block(params, kernel=2, padding="same", pool="none")])
    first = build_cnn(model, 1, HW, 3).features[0]
    assert isinstance(first.pad, nn.ZeroPad2d)
    assert first.pad.padding == (0, 1, 0, 1)  # the extra pixel goes right/bottom, as in TF
    assert first.conv.padding == (0, 0)


def test_layer_structure(params):
    net = build_cnn(params.model, 1, (28, 28), 10)
    first = net.features[0]
    assert [name for name, _ in first.named_children()] == ["conv", "bn", "act", "pool"]
    assert first.conv.bias is None  # BN makes the conv bias redundant
    no_bn = model_variant(params, conv=[block(params, batch_norm=False, pool="none")])
    plain = build_cnn(no_bn, 1, HW, 3).features[0]
    assert [name for name, _ in plain.named_children()] == ["conv", "act"]
    assert plain.conv.bias is not None
    heads = [name for name, _ in net.classifier.named_children()]
    assert heads == ["flatten", "fc0", "relu0", "drop0", "out"]
    bare = build_cnn(model_variant(params, hidden=[]), 1, HW, 3).classifier
    assert [name for name, _ in bare.named_children()] == ["flatten", "drop", "out"]
    assert bare.drop.p == params.model.dropout


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid"])
def test_activations_build(params, activation):
    model = model_variant(params, conv=[block(params, activation=activation)])
    assert build_cnn(model, 3, HW, 3)(torch.randn(1, 3, *HW)).shape == (1, 3)


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_layer_shapes_count_matches_built_model(params, hidden, batch_norm):
    conv = [block(params, filters=6, batch_norm=batch_norm), block(params, filters=4, stride=2)]
    model = model_variant(params, conv=conv, hidden=hidden)
    rows = layer_shapes(model, 3, (16, 12), 5)
    assert sum(row.parameters for row in rows) == count_parameters(build_cnn(model, 3, (16, 12), 5))
    assert [row.name for row in rows][:4] == [
        "model.conv[0]",
        "model.conv[0].pool",
        "model.conv[1]",
        "model.conv[1].pool",
    ]
    assert rows[-1].name == "output"
    assert rows[-1].shape == (5,)


def test_count_parameters_trainable_only():
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    assert count_parameters(net) == 8
    assert count_parameters(net, trainable_only=True) == 6


def test_shape_error_names_pool_layer_and_sizes(params):
    # 8 -> pool 4 -> conv keeps 2 -> pool 2 -> 1 -> conv keeps 1 -> pool 2 -> 0
    conv = [block(params, pool_size=4), block(params), block(params)]
    with pytest.raises(ConvpipeError) as info:
        build_cnn(model_variant(params, conv=conv), 1, HW, 3)
    message = str(info.value)
    assert "model.conv[2].pool" in message
    assert "1x1 feature map" in message
    assert "0x0" in message
    assert "8x8 input images" in message
    assert "data.image_size" in message


def test_shape_error_names_valid_conv(params):
    conv = [block(params, kernel=5, padding="valid", pool="none")]
    with pytest.raises(ConvpipeError, match=r"model\.conv\[0\] .*3x4 feature map.*-1x0"):
        layer_shapes(model_variant(params, conv=conv), 1, (3, 4), 3)


@pytest.mark.parametrize(
    ("channels", "hw", "classes", "match"),
    [
        (2, HW, 3, "1 \\(grey\\) or 3 \\(RGB\\) channels"),
        (True, HW, 3, "channels"),
        (1, HW, 1, "at least 2 classes"),
        (1, (8,), 3, "image_hw"),
        (1, (0, 8), 3, "image_hw"),
    ],
)
def test_bad_model_inputs(params, channels, hw, classes, match):
    with pytest.raises(ConvpipeError, match=match):
        build_cnn(params.model, channels, hw, classes)


def test_output_units():
    assert output_units(2) == 1
    assert output_units(10) == 10


# --------------------------------------------------------------------------- losses and penalty


def test_binary_forward_and_bce_matches_hand_computation(params):
    module = classifier(params, num_classes=2)
    assert module.net.classifier.out.out_features == 1
    x = torch.randn(4, 1, *HW)
    logits = module(x)
    assert logits.shape == (4,)
    y = torch.tensor([0, 1, 1, 0])
    p = 1 / (1 + torch.exp(-logits))
    hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert torch.allclose(module.data_loss(logits, y), hand, atol=1e-6)


def test_multiclass_cross_entropy_matches_hand_computation(params):
    module = classifier(params, num_classes=3)
    logits = module(torch.randn(4, 1, *HW))
    assert logits.shape == (4, 3)
    y = torch.tensor([0, 2, 1, 2])
    log_softmax = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
    hand = -log_softmax[torch.arange(4), y].mean()
    assert torch.allclose(module.data_loss(logits, y), hand, atol=1e-6)


def known_weights_model() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 1, 2), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(2, 1), nn.Linear(1, 1)
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]]))  # l1 10, l2 30
        net[3].weight.copy_(torch.tensor([[0.5, -1.5]]))  # l1 2, l2 2.5
        net[4].weight.fill_(-2.0)  # l1 2, l2 4
        for bias in (net[0].bias, net[3].bias, net[4].bias):
            bias.fill_(100.0)
        net[1].weight.fill_(50.0)
        net[1].bias.fill_(70.0)
    return net


@pytest.mark.parametrize(("reg_type", "weight_sum"), [("l1", 14.0), ("l2", 36.5), ("none", 0.0)])
def test_penalty_by_hand(reg_type, weight_sum):
    net = known_weights_model()
    penalty = regularization_penalty(net, reg_type, reg_lambda=0.2, m=4)
    assert penalty.shape == ()
    assert penalty.item() == pytest.approx(0.2 / 4 * weight_sum)


def test_penalty_ignores_biases_and_batchnorm():
    net = known_weights_model()
    regularization_penalty(net, "l2", reg_lambda=0.2, m=4).backward()
    assert net[0].weight.grad is not None
    assert torch.allclose(net[0].weight.grad, 2 * 0.05 * net[0].weight.detach())
    for param in (net[0].bias, net[1].weight, net[1].bias, net[3].bias, net[4].bias):
        assert param.grad is None


def test_penalty_zero_lambda_and_bad_arguments():
    net = known_weights_model()
    assert regularization_penalty(net, "l1", 0.0, 10).item() == 0.0
    with pytest.raises(ConvpipeError, match="training-set size m"):
        regularization_penalty(net, "l2", 0.1, 0)
    with pytest.raises(ConvpipeError, match="unknown regularisation"):
        regularization_penalty(net, "l3", 0.1, 5)
    with pytest.raises(ConvpipeError, match=">= 0"):
        regularization_penalty(net, "l1", -1.0, 5)


def test_module_penalty_uses_train_size(params):
    module = classifier(params, reg_type="l2", reg_lambda=0.5)
    layers = [m for m in module.net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hand = sum(float((m.weight.detach() ** 2).sum()) for m in layers)
    assert float(module.penalty().detach()) == pytest.approx(0.5 / 32 * hand, rel=1e-5)


# --------------------------------------------------------------------------- probabilities


def test_probabilities_pure_helper():
    binary = probabilities(torch.tensor([0.0, 2.0]), 2)
    assert binary.shape == (2, 2)
    assert binary[0].tolist() == pytest.approx([0.5, 0.5])
    assert binary[1, 1].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert torch.equal(probabilities(torch.tensor([[0.0], [2.0]]), 2), binary)
    multi = probabilities(torch.randn(5, 4), 4)
    assert torch.allclose(multi.sum(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        probabilities(torch.randn(5, 3), 4)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_predict_returns_probabilities(params, num_classes):
    module = classifier(params, num_classes=num_classes, channels=3)
    x = torch.randn(10, 3, *HW)
    with_labels = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)
    outputs = trainer().predict(module, with_labels)
    assert outputs is not None
    probs = torch.cat(outputs)  # type: ignore[arg-type]
    assert probs.shape == (10, num_classes)
    assert torch.allclose(probs.sum(dim=1), torch.ones(10), atol=1e-6)
    module.eval()
    assert torch.allclose(module.predict_step(x, 0), probs, atol=1e-6)


def test_forward_rejects_wrong_input_shape(params):
    module = classifier(params)
    with pytest.raises(ConvpipeError, match=r"expects images of shape \(N, 1, 8, 8\)"):
        module(torch.randn(2, 1, 9, 8))


# --------------------------------------------------------------------------- LightningModule


def test_hparams_are_plain_and_validated(params):
    module = CNNClassifier(
        tiny_model(params), params.train, 1, HW, 2, 32, class_names=("zero", "one")
    )
    assert module.hparams["model"] == tiny_model(params).model_dump()
    assert module.hparams["train"] == params.train.model_dump()
    assert module.hparams["image_hw"] == [8, 8]
    assert module.hparams["class_names"] == ["zero", "one"]
    bad = {**params.model.model_dump(), "dropuot": 0.2}
    with pytest.raises(ConvpipeError, match=r"did you mean 'model\.dropout'"):
        CNNClassifier(bad, params.train.model_dump(), 1, HW, 3, 32)
    with pytest.raises(ConvpipeError, match="train_size"):
        CNNClassifier(params.model.model_dump(), params.train.model_dump(), 1, HW, 3, 0)
    with pytest.raises(ConvpipeError, match="class names"):
        CNNClassifier(params.model.model_dump(), params.train.model_dump(), 1, HW, 3, 5, ["a"])
    with pytest.raises(ConvpipeError, match="nesterov needs a momentum"):
        classifier(params, optimizer="nesterov", momentum=0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_every_optimizer_trains(params, optimizer):
    module = classifier(params, optimizer=optimizer, lr=0.05)
    before = [p.detach().clone() for p in module.parameters()]
    fitted = trainer()
    fitted.fit(module, loader())
    assert fitted.global_step == 3
    changed = [not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True)]
    assert all(changed)
    opt = fitted.optimizers[0]
    group = opt.param_groups[0]
    assert group["lr"] == 0.05
    assert group.get("weight_decay", 0.0) == 0.0
    if optimizer in ("momentum", "nesterov"):
        assert group["momentum"] == params.train.momentum
        assert group["nesterov"] is (optimizer == "nesterov")
    expected = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(
        optimizer, torch.optim.SGD
    )
    assert type(opt) is expected


def test_training_lowers_the_loss_on_a_learnable_batch(params):
    module = classifier(params, num_classes=2, optimizer="adam", lr=0.01, reg_type="none")
    x = torch.randn(16, 1, *HW)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    module.eval()
    with torch.no_grad():
        before = module.data_loss(module(x), y).item()
    trainer(max_steps=20).fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    module.eval()
    with torch.no_grad():
        after = module.data_loss(module(x), y).item()
    assert after < before


def test_logged_keys_and_objective(params):
    module = classifier(params, reg_type="l2", reg_lambda=1.0)
    fitted = trainer(max_steps=-1, max_epochs=1)
    fitted.fit(module, loader(), loader())
    metrics = fitted.callback_metrics
    for key in ("train/loss", "train/acc", "train/penalty", "train/objective"):
        assert key in metrics
    for key in ("val/loss", "val/acc"):
        assert key in metrics
    assert metrics["train/penalty"] > 0
    objective = metrics["train/loss"] + metrics["train/penalty"]
    assert metrics["train/objective"].item() == pytest.approx(objective.item(), rel=1e-5)
    fitted.test(module, loader(), verbose=False)
    assert {"test/loss", "test/acc"} <= set(fitted.callback_metrics)
    assert 0.0 <= fitted.callback_metrics["test/acc"].item() <= 1.0


@pytest.mark.parametrize(
    ("scheduler", "factor"),
    [
        ("none", 1.0),
        ("cosine", (1 + math.cos(math.pi * 2 / 3)) / 2),
        ("step", 0.01),
        ("plateau", None),
    ],
)
def test_schedulers_construct_and_step(params, scheduler, factor):
    module = classifier(params, scheduler=scheduler, max_epochs=3, lr=0.1, optimizer="sgd")
    fitted = trainer(max_steps=-1, max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    fitted.fit(module, loader(), loader())
    lr = fitted.optimizers[0].param_groups[0]["lr"]
    if factor is None:
        config = fitted.lr_scheduler_configs[0]
        assert isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert config.monitor == params.train.monitor
    else:
        assert lr == pytest.approx(0.1 * factor)


def test_plateau_monitor_comes_from_params(params):
    train = train_variant(params, scheduler="plateau", monitor="val/acc", monitor_mode="max")
    optimizer = build_optimizer(nn.Linear(2, 2), train, 16)
    config = build_scheduler(optimizer, train)
    assert config is not None
    assert config["monitor"] == "val/acc"
    scheduler = config["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.mode == "max"
    assert build_scheduler(optimizer, train_variant(params, scheduler="none")) is None


def test_nan_loss_raises_convpipe_error(params):
    module = classifier(params)
    with pytest.raises(ConvpipeError, match=r"loss became nan at epoch 0, step 0.*lower train\.lr"):
        trainer().fit(module, loader(nan=True))


def test_checkpoint_round_trip_weights_only(params, tmp_path):
    module = classifier(params, num_classes=2, channels=3, scheduler="plateau")
    fitted = trainer(max_steps=-1, max_epochs=1, limit_val_batches=1)
    fitted.fit(module, loader(2, channels=3), loader(2, channels=3))
    path = tmp_path / "model.ckpt"
    fitted.save_checkpoint(path)
    loaded = CNNClassifier.load_from_checkpoint(path, weights_only=True)
    assert dict(loaded.hparams) == dict(module.hparams)
    x = torch.randn(5, 3, *HW)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(module(x), loaded(x))


def test_onecycle_warms_up_then_anneals_per_step(params):
    train = train_variant(params, scheduler="onecycle", optimizer="sgd", lr=0.1)
    optimizer = build_optimizer(nn.Linear(2, 2), train, 16)
    config = build_scheduler(optimizer, train, total_steps=10)
    assert config is not None and config["interval"] == "step"
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):  # a loop steps the scheduler after each of its 10 optimiser steps
        optimizer.step()
        config["scheduler"].step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1 / 25)  # warm-up start
    assert max(lrs) == pytest.approx(0.1, rel=0.05)  # the peak is train.lr
    assert lrs.index(max(lrs)) in (2, 3)  # after 30 % of the steps
    assert lrs == sorted(lrs[:3]) + sorted(lrs[3:], reverse=True)  # up, then down
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)  # the end of the anneal, not past it
    assert optimizer.param_groups[0]["momentum"] == 0  # plain SGD stays plain
    with pytest.raises(ValueError, match="number of training steps"):
        build_scheduler(optimizer, train)


def test_onecycle_spans_the_whole_fit(params):
    module = classifier(params, scheduler="onecycle", max_epochs=3, lr=0.1, optimizer="adam")
    fitted = trainer(max_steps=-1, max_epochs=3)
    fitted.fit(module, loader())
    config = fitted.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert fitted.global_step == 3 * 2  # 16 images, batch 8
    assert config.scheduler.total_steps == fitted.global_step + 1
    assert fitted.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 25 / 1e4)


def test_train_metrics_are_exact_epoch_means(params):
    """One log per epoch, at its last step: the means over every image of the epoch."""
    model = tiny_model(params).model_copy(update={"dropout": 0.0})
    module = classifier(params, model=model, optimizer="sgd", lr=1e-12, reg_type="l2")
    data = loader(n=20)  # batches of 8, 8 and 4: the mean must weight them by size
    module.train()
    with torch.no_grad():
        pairs = [(module(x), y) for x, y in data]
    images = sum(len(y) for _, y in pairs)
    loss = sum(float(module.data_loss(logits, y)) * len(y) for logits, y in pairs) / images
    right = sum(int((logits.argmax(1) == y).sum()) for logits, y in pairs)
    penalty = float(module.penalty().detach())
    fitted = trainer(max_steps=-1, max_epochs=1)
    fitted.fit(module, data)
    metrics = fitted.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(loss, rel=1e-5)
    assert metrics["train/acc"].item() == pytest.approx(right / images)
    assert metrics["train/penalty"].item() == pytest.approx(penalty, rel=1e-5)
    assert metrics["train/objective"].item() == pytest.approx(loss + penalty, rel=1e-5)


def test_train_metrics_when_max_steps_ends_an_epoch_early(params):
    module = classifier(params)
    fitted = trainer(max_steps=3)  # epoch 0: 2 steps, epoch 1: 1 step
    fitted.fit(module, loader())
    assert fitted.global_step == 3
    assert {"train/loss", "train/acc", "train/objective"} <= set(fitted.callback_metrics)


def test_cpu_threads():
    assert cpu_threads(3, 1) == 3 and cpu_threads(3, 4) == 3
    all_cores = cpu_threads("auto", 1)
    assert all_cores >= 1
    assert cpu_threads("auto", 2) == max(1, all_cores // 2)
    assert cpu_threads("auto", 10_000) == 1


def test_fit_uses_runtime_threads(params):
    before = torch.get_num_threads()
    try:
        trainer().fit(classifier(params, runtime={"threads": 1}), loader())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_channels_last_changes_layout_not_results(params):
    nhwc = classifier(params, channels=3, runtime={"channels_last": True})  # with 1 channel
    nchw = classifier(params, channels=3)  # both layouts have the same strides
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.state_dict().keys() == nchw.state_dict().keys()
    conv = nhwc.net.features[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(4, 3, *HW)
    nhwc.eval()
    nchw.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_trains_and_keeps_parameter_names(params, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    module = classifier(params, runtime={"compile": True})
    names = list(module.state_dict())
    fitted = trainer(max_steps=-1, max_epochs=2)
    fitted.fit(module, loader(), loader())
    assert fitted.global_step == 4 and "train/loss" in fitted.callback_metrics
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled, not silently skipped
    assert list(module.state_dict()) == names  # no _orig_mod. prefix: checkpoints load eagerly
    path = tmp_path / "model.ckpt"
    fitted.save_checkpoint(path)
    loaded = CNNClassifier.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(3, 1, *HW)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), loaded(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_metrics_are_global_means_under_ddp(params):
    """Each rank sums its share; the logged epoch means are over every image of both ranks."""
    conv = [block(params, filters=4, batch_norm=False)]  # no batch norm: a per-image loss that
    model = model_variant(params, conv=conv, hidden=[8], dropout=0.0)  # no shard changes
    module = classifier(params, model=model, optimizer="sgd", lr=1e-12, reg_type="none")
    x, y = torch.randn(32, 1, *HW), torch.randint(0, 3, (32,))
    with torch.no_grad():
        losses = F.cross_entropy(module(x), y, reduction="none")
        right = (module(x).argmax(1) == y).float()
    halves = losses.view(16, 2).mean(0)  # what either rank alone would log
    assert abs(float(halves[0] - halves[1])) > 1e-3
    fitted = trainer(max_steps=-1, max_epochs=1, strategy="ddp_spawn", devices=2)
    fitted.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    metrics = fitted.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert metrics["train/acc"].item() == pytest.approx(right.mean().item())


def test_a_checkpoint_with_runtime_keys_under_train_still_loads(params, tmp_path):
    """Before the runtime section, checkpoints stored its keys under ``train``: dropped."""
    module = classifier(params, runtime={"channels_last": True})
    fitted = trainer(max_steps=1)
    fitted.fit(module, loader())
    path = tmp_path / "old.ckpt"
    fitted.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert "channels_last" not in checkpoint["hyper_parameters"]["train"]  # how, not what
    checkpoint["hyper_parameters"]["train"].update(threads=2, channels_last=True, compile=False)
    torch.save(checkpoint, path)
    loaded = CNNClassifier.load_from_checkpoint(path, weights_only=True)
    assert loaded.runtime is None  # runs NCHW, eager, until told otherwise
    x = torch.randn(2, 1, *HW)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), loaded(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConvpipeError, match=r"train\.thread"):  # other unknown keys: refused
        CNNClassifier(tiny_model(params), {**params.train.model_dump(), "thread": 2}, 1, HW, 3, 32)

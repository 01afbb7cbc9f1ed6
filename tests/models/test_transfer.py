"""Fine-tuning: reading trained weights, taking what fits, freezing and slowing the backbone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from convpipe.errors import ConvpipeError
from convpipe.models.module import CNNClassifier
from convpipe.models.network import backbone_parameters
from convpipe.models.optim import parameter_groups
from convpipe.models.transfer import read_weights, transfer_weights
from convpipe.training.callbacks import FreezeBackbone
from convpipe.training.trainer import _with_unused_parameters
from tests.helpers.models import (
    QUIET_LIGHTNING,
    TINY_CONV,
    TINY_RESIDUAL,
    fit_and_save,
    loader,
    model_section,
    quiet_trainer,
    residual_stage,
    train_variant,
)

pytestmark = QUIET_LIGHTNING

CLASSES = ["a", "b", "c"]


def _classifier(
    raw_params: dict[str, Any],
    model: dict[str, Any] = TINY_RESIDUAL,
    classes: list[str] = CLASSES,
    channels: int = 1,
    **train: Any,
) -> CNNClassifier:
    return CNNClassifier(
        model,
        {**raw_params["train"], **train},
        in_channels=channels,
        image_hw=(8, 8),
        num_classes=len(classes),
        train_size=16,
        class_names=classes,
    )


@pytest.fixture
def trained(raw_params, tmp_path) -> tuple[Path, CNNClassifier]:
    """A checkpoint of the tiny residual network after two optimiser steps."""
    torch.manual_seed(1)
    model = _classifier(raw_params)
    path = tmp_path / "source.ckpt"
    fit_and_save(model, loader(3, 16), tmp_path, path, max_steps=2)
    return path, model


# --------------------------------------------------------------------------- reading


def test_a_checkpoint_gives_the_network_tensors_and_the_classes(trained) -> None:
    path, model = trained
    source = read_weights(path)
    assert source.class_names == CLASSES
    assert set(source.state) == set(model.net.state_dict())
    assert torch.equal(source.state["features.0.conv.weight"], model.net.features[0].conv.weight)


@pytest.mark.parametrize("prefix", ["", "net."])
def test_a_state_dict_file_reads_with_or_without_the_net_prefix(trained, tmp_path, prefix) -> None:
    _, model = trained
    path = tmp_path / "weights.pt"
    torch.save({prefix + k: v for k, v in model.net.state_dict().items()}, path)
    source = read_weights(path)
    assert source.class_names is None
    assert set(source.state) == set(model.net.state_dict())


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo owned",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"features.0.conv.weight": _RunsCode()}, r"it would run code \((posix|nt)\.system\)"),
        ([1, 2, 3], "not a checkpoint or a state dict"),
        ({"features.0.conv.weight": 3}, "holds int at key 'features.0.conv.weight'"),
    ],
    ids=["code", "list", "not-tensors"],
)
def test_unsafe_or_foreign_files_are_one_error_line(tmp_path, content, message) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ConvpipeError, match=message) as info:
        read_weights(path)
    assert "\n" not in str(info.value)


def test_a_truncated_checkpoint_is_one_error_line(trained, tmp_path) -> None:
    path, _ = trained
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConvpipeError, match=r"cannot load model.init_from"):
        read_weights(cut)


def test_a_checkpoint_with_foreign_hyperparameters_is_refused(trained, tmp_path) -> None:
    path, _ = trained
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_instantiator"] = "os.system"
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(ConvpipeError, match="_instantiator"):
        read_weights(tmp_path / "odd.ckpt")


# --------------------------------------------------------------------------- transfer


def test_same_network_and_classes_takes_every_tensor(raw_params, trained) -> None:
    path, source_model = trained
    torch.manual_seed(7)
    model = _classifier(raw_params)
    report = transfer_weights(model.net, read_weights(path), "src.ckpt", CLASSES)
    assert not report.new and len(report.taken) == len(model.net.state_dict())
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, source_model.net.state_dict()[key]), key
    assert report.describe("src.ckpt").endswith("from src.ckpt (every layer)")


def test_other_classes_keep_the_backbone_and_rebuild_the_output_layer(raw_params, trained) -> None:
    path, source_model = trained
    torch.manual_seed(7)
    model = _classifier(raw_params, classes=["cat", "dog"])
    fresh_out = model.net.classifier.out.weight.detach().clone()
    report = transfer_weights(model.net, read_weights(path), "src.ckpt", ["cat", "dog"])
    assert sorted(report.new) == ["classifier.out.bias", "classifier.out.weight"]
    assert torch.equal(model.net.classifier.out.weight, fresh_out)
    for key, value in model.net.features.state_dict().items():
        assert torch.equal(value, source_model.net.features.state_dict()[key]), key
    line = report.describe("src.ckpt")
    assert "new: classifier.out (other classes: 3 there, 2 here)" in line
    assert line.startswith(f"model.init_from: took {len(report.taken)} of ")


def test_same_count_but_other_class_names_still_rebuilds_the_head(raw_params, trained) -> None:
    path, _ = trained
    model = _classifier(raw_params, classes=["x", "y", "z"])
    report = transfer_weights(model.net, read_weights(path), "src", ["x", "y", "z"])
    assert sorted(report.new) == ["classifier.out.bias", "classifier.out.weight"]


def test_images_with_other_channels_are_named_in_the_error(raw_params, trained) -> None:
    path, _ = trained
    model = _classifier(raw_params, channels=3)
    with pytest.raises(ConvpipeError, match="trained on 1-channel images, the data has 3"):
        transfer_weights(model.net, read_weights(path), "src", CLASSES)


@pytest.mark.parametrize(
    "model",
    [
        model_section(TINY_CONV, [], 0.0, stages=[residual_stage(4, stride=1)], global_pool="avg"),
        model_section(
            TINY_CONV,
            [],
            0.0,
            stages=[residual_stage(4, stride=1), residual_stage(16, stride=2)],
            global_pool="avg",
        ),
        model_section(TINY_CONV, [8], 0.0),
    ],
    ids=["shallower", "wider", "plain-cnn"],
)
def test_another_architecture_is_one_error(raw_params, trained, model) -> None:
    path, _ = trained
    target = _classifier(raw_params, model=model)
    with pytest.raises(ConvpipeError, match="another architecture") as info:
        transfer_weights(target.net, read_weights(path), "src.ckpt", CLASSES)
    assert "at src.ckpt" in str(info.value)


# --------------------------------------------------------------------------- freezing


def test_frozen_epochs_leave_the_backbone_convs_then_train_them(raw_params, tmp_path) -> None:
    torch.manual_seed(0)
    model = _classifier(raw_params, lr=0.05, reg_lambda=0.0)
    convs = [p for p in backbone_parameters(model.net) if p.ndim > 1]
    norms = [p for p in backbone_parameters(model.net) if p.ndim == 1 and p.requires_grad]
    start = [p.detach().clone() for p in convs + norms + [model.net.classifier.out.weight]]

    def moved() -> list[bool]:
        now = convs + norms + [model.net.classifier.out.weight]
        return [not torch.equal(a, b) for a, b in zip(start, now, strict=True)]

    seen: list[list[bool]] = []

    class _Watch(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.append(moved())

    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[FreezeBackbone(1), _Watch()])
    trainer.fit(model, loader(3, 16))
    first, second = seen
    assert not any(first[: len(convs)])  # epoch 0: conv weights frozen ...
    assert all(first[len(convs) :])  # ... BN scales/shifts and the head trained
    assert all(second[: len(convs)])  # epoch 1: everything trains
    assert all(p.requires_grad for p in convs)


def test_freezing_never_unfreezes_what_was_fixed(raw_params, tmp_path) -> None:
    model = _classifier(raw_params, model={**TINY_RESIDUAL, "batch_norm_scale": False})
    fixed = [p for p in model.net.parameters() if not p.requires_grad]
    assert fixed  # the BN scales
    freeze = FreezeBackbone(1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[freeze]).fit(model, loader(3, 16))
    assert not any(p.requires_grad for p in fixed)


def test_backbone_lr_scale_gives_the_backbone_its_own_groups(make_params) -> None:
    params = make_params()
    net = _classifier(params.model_dump(mode="json")).net
    train = train_variant(params, lr=0.01, backbone_lr_scale=0.1, norm_bias_lr_scale=2.0)
    groups = {g["name"]: g for g in parameter_groups(net, train, 64)}
    assert set(groups) == {"weights", "norm_bias", "backbone_weights", "backbone_norm_bias"}
    assert groups["backbone_weights"]["lr"] == pytest.approx(0.001)
    assert groups["backbone_norm_bias"]["lr"] == pytest.approx(0.002)
    assert groups["norm_bias"]["lr"] == pytest.approx(0.02)
    backbone = {id(p) for p in backbone_parameters(net)}
    assert {
        id(p) for g in ("backbone_weights", "backbone_norm_bias") for p in groups[g]["params"]
    } == backbone
    assert len([p for g in groups.values() for p in g["params"]]) == len(list(net.parameters()))


def test_a_scale_of_one_keeps_one_group(make_params) -> None:
    params = make_params()
    net = _classifier(params.model_dump(mode="json")).net
    assert len(parameter_groups(net, params.train, 64)) == 1


@pytest.mark.parametrize(
    ("strategy", "devices", "freeze", "expected"),
    [
        ("ddp", 2, 1, "ddp_find_unused_parameters_true"),
        ("auto", 2, 1, "ddp_find_unused_parameters_true"),
        ("ddp_spawn", 2, 1, "ddp_spawn_find_unused_parameters_true"),
        ("ddp", 2, 0, "ddp"),
        ("auto", 1, 1, "auto"),
        ("fsdp", 2, 1, "fsdp"),
    ],
)
def test_ddp_follows_a_frozen_backbone(make_params, strategy, devices, freeze, expected) -> None:
    train = train_variant(make_params(), devices=devices, freeze_epochs=freeze)
    assert _with_unused_parameters(train, strategy) == expected


# --------------------------------------------------------------------------- params


def test_freezing_without_init_is_refused(make_params) -> None:
    with pytest.raises(ConvpipeError, match=r"train.freeze_epochs 2 freezes trained layers"):
        make_params(**{"train.freeze_epochs": 2})


@pytest.mark.parametrize(
    "path", ["models/model.ckpt", "./models/model.ckpt", "checkpoints/last.ckpt"]
)
def test_starting_from_the_stages_own_output_is_refused(make_params, path) -> None:
    with pytest.raises(ConvpipeError, match=r"train stage's own output.*copy it first"):
        make_params(**{"model.init_from": path})


def test_a_state_dict_of_some_other_network_is_another_architecture(raw_params, tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)).state_dict(), path)
    target = _classifier(raw_params)
    with pytest.raises(
        ConvpipeError, match=r"it has no features.0.conv.weight: another architecture"
    ):
        transfer_weights(target.net, read_weights(path), str(path), CLASSES)


def test_other_classes_keep_the_hidden_layers_too(raw_params, tmp_path) -> None:
    plain = model_section(TINY_CONV, [8], 0.0)
    source = _classifier(raw_params, model=plain)
    path = tmp_path / "plain.pt"
    torch.save(source.net.state_dict(), path)
    target = _classifier(raw_params, model=plain, classes=["cat", "dog"])
    weights = read_weights(path)
    weights.class_names = CLASSES
    report = transfer_weights(target.net, weights, "plain.pt", ["cat", "dog"])
    assert sorted(report.new) == ["classifier.out.bias", "classifier.out.weight"]
    assert torch.equal(target.net.classifier.fc0.weight, source.net.classifier.fc0.weight)

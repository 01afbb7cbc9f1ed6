"""Residual stages and global pooling: shapes, counts, FLOPs, initialisation, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convpipe.config.schema import ModelParams, parse_params, scaled_model
from convpipe.errors import ConvpipeError
from convpipe.models.module import CNNClassifier
from convpipe.models.network import build_cnn, count_parameters, regularization_penalty
from convpipe.models.residual import ResidualBlock
from convpipe.models.shapes import layer_shapes
from convpipe.tools.summary import format_summary, receptive_fields
from tests.helpers.models import (
    QUIET_LIGHTNING,
    TINY_CONV,
    TINY_RESIDUAL,
    model_section,
    residual_stage,
    train_variant,
    trainer,
)

pytestmark = QUIET_LIGHTNING


def _model(conv: list[dict[str, Any]] | None = None, **more: Any) -> ModelParams:
    return ModelParams.model_validate(model_section(conv or TINY_CONV, [], 0.0, **more))


def _resnet(block: str, depths: tuple[int, ...], width: int = 1) -> ModelParams:
    """He et al.'s ImageNet ResNets: a 7x7/2 stem, a 2x2 max pool, four stages, average pool."""
    stem = [
        {
            "filters": 64,
            "kernel": 7,
            "stride": 2,
            "padding": "same",
            "activation": "relu",
            "batch_norm": True,
            "pool": "max",
            "pool_size": 2,
        }
    ]
    stages = [
        residual_stage(f * width, n, 1 if i == 0 else 2, block=block)
        for i, (f, n) in enumerate(zip((64, 128, 256, 512), depths, strict=True))
    ]
    return _model(stem, stages=stages, global_pool="avg")


def _forward_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # torchvision's resnet18 / resnet50 have exactly these counts (1000 classes)
        (_resnet("basic", (2, 2, 2, 2)), 11_689_512),
        (_resnet("bottleneck", (3, 4, 6, 3), width=4), 25_557_032),
    ],
    ids=["resnet18", "resnet50"],
)
def test_resnet_parameter_counts_and_flops_match_the_built_network(model, expected) -> None:
    net = build_cnn(model, 3, (224, 224), 1000)
    rows = layer_shapes(model, 3, (224, 224), 1000)
    assert count_parameters(net) == sum(r.parameters for r in rows) == expected
    assert sum(r.flops for r in rows) == _forward_flops(net, (3, 224, 224))
    assert net(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


@pytest.mark.parametrize("hw", [(15, 13), (8, 8), (3, 5)])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("pool", ["avg", "max", "none"])
def test_every_stage_row_has_the_shape_the_network_gives(hw, block, pool) -> None:
    stages = [residual_stage(8, 2, 1, block=block), residual_stage(16, 1, 2, block=block)]
    model = _model(stages=stages, global_pool=pool)
    net = build_cnn(model, 1, hw, 3).eval()
    rows = {r.name: r for r in layer_shapes(model, 1, hw, 3)}
    h = net.features[0](torch.zeros(1, 1, *hw))
    for i in range(2):
        for j, block_module in enumerate(net.features.get_submodule(f"stage{i}")):
            h = block_module(h)
            assert tuple(h.shape[1:]) == rows[f"model.stages[{i}][{j}]"].shape
    assert rows["flatten"].shape == (16 if pool != "none" else h[0].numel(),)
    assert count_parameters(net) == sum(r.parameters for r in rows.values())
    assert sum(r.flops for r in rows.values()) == _forward_flops(net, (1, *hw))


def test_global_pool_makes_the_output_layer_as_wide_as_the_channels() -> None:
    flat = layer_shapes(_model(global_pool="none"), 1, (32, 32), 5)
    pooled = layer_shapes(_model(global_pool="avg"), 1, (32, 32), 5)
    assert flat[-1].layer.endswith("linear 1024->5")  # 4 filters x 16 x 16
    assert pooled[-1].layer.endswith("linear 4->5")
    assert [r.name for r in pooled][-3:] == ["global_pool", "flatten", "output"]


def test_avg_pool_head_averages_and_max_pool_head_takes_the_maximum() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    for pool, reduce in (("avg", torch.mean), ("max", torch.amax)):
        net = build_cnn(_model(global_pool=pool), 1, (8, 8), 3).eval()
        maps = net.features(x)
        expected = net.classifier.out(reduce(maps, dim=(2, 3)))
        assert torch.allclose(net(x), expected, atol=1e-6)


def test_projection_shortcut_only_where_the_size_or_width_changes() -> None:
    model = _model(stages=[residual_stage(4, 2, 1), residual_stage(8, 2, 2)], global_pool="avg")
    net = build_cnn(model, 1, (8, 8), 3)
    kinds = [
        type(net.features.get_submodule(f"stage{i}.{j}.shortcut")).__name__
        for i in range(2)
        for j in range(2)
    ]
    # stage 0 keeps TINY_CONV's 4 channels at stride 1: identity; stage 1's first block projects
    assert kinds == ["Identity", "Identity", "Sequential", "Identity"]


def test_bottleneck_block_squeezes_to_a_quarter_of_the_filters() -> None:
    model = _model(stages=[residual_stage(16, 1, 2, block="bottleneck")], global_pool="avg")
    block = build_cnn(model, 1, (8, 8), 3).features.get_submodule("stage0.0")
    widths = [m.out_channels for m in block.branch if isinstance(m, nn.Conv2d)]
    assert widths == [4, 4, 16]
    assert block.branch.conv2.stride == (2, 2)  # ResNet v1.5: the stride on the 3x3 conv


def test_each_block_starts_as_its_shortcut_when_bn_scales_are_learnt() -> None:
    torch.manual_seed(0)
    model = _model(stages=[residual_stage(4, 1, 1), residual_stage(8, 1, 2)], global_pool="avg")
    net = build_cnn(model, 1, (8, 8), 3).eval()
    x = torch.randn(3, 4, 8, 8)
    for name in ("stage0.0", "stage1.0"):
        block = net.features.get_submodule(name)
        assert isinstance(block, ResidualBlock)
        assert torch.equal(block(x), torch.relu(block.shortcut(x)))
        x = block(x)


def test_fixed_bn_scales_keep_the_residual_branch_alive() -> None:
    model = _model(stages=[residual_stage(4, 1, 1)], global_pool="avg", batch_norm_scale=False)
    block = build_cnn(model, 1, (8, 8), 3).features.get_submodule("stage0.0")
    last = block.branch.bn2
    assert torch.equal(last.weight, torch.ones(4)) and not last.weight.requires_grad
    x = torch.randn(2, 4, 8, 8)
    block.train()
    assert not torch.equal(block(x), torch.relu(block.shortcut(x)))


def test_the_penalty_covers_every_conv_of_the_stages_and_shortcuts() -> None:
    model = _model(stages=[residual_stage(8, 2, 2)], global_pool="avg")
    net = build_cnn(model, 1, (8, 8), 3)
    convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(convs) == 1 + 2 * 2 + 1 + 1  # stem, 2 blocks x 2 convs, projection, output
    expected = sum(float(w.detach().pow(2).sum()) for w in convs) * 0.5 / 10
    assert float(regularization_penalty(net, "l2", 0.5, 10).detach()) == pytest.approx(
        expected, rel=1e-6
    )


def test_receptive_field_through_residual_blocks_by_hand() -> None:
    stages = [
        residual_stage(4, 1, 1),
        residual_stage(8, 1, 2),
        residual_stage(16, 1, 2, block="bottleneck"),
    ]
    rows = {
        r.name: r
        for r in receptive_fields(_model(stages=stages, global_pool="avg"), 1, (32, 32), 3)
    }
    # stem 3x3 conv: r=3, j=1; 2x2 pool: r=4, j=2
    # basic /1: two 3x3 at j=2: r = 4 + 4 + 4 = 12, j = 2
    # basic /2: 3x3/2 at j=2 -> r=16, j=4; 3x3 at j=4 -> r=24
    # bottleneck /2: 1x1, 3x3/2 at j=4 -> r=32, j=8, 1x1
    expected = {
        "model.stages[0][0]": (12, 2),
        "model.stages[1][0]": (24, 4),
        "model.stages[2][0]": (32, 8),
    }
    for name, (field, jump) in expected.items():
        assert (rows[name].receptive_field, rows[name].jump) == (field, jump)
    assert rows["global_pool"].receptive_field is None  # the whole image


def test_summary_table_shows_stages_and_forward_flops() -> None:
    from convpipe.tools.summary import summary_dict

    class _Manifest:
        channels, image_hw, num_classes = 3, (32, 32), 10

    model = ModelParams.model_validate(TINY_RESIDUAL)
    summary = summary_dict(model, _Manifest())  # type: ignore[arg-type]
    text = format_summary(summary)
    assert "model.stages[1][0]  basic 4->8/2 proj relu" in text
    assert "global_pool" in text
    net = build_cnn(model, 3, (32, 32), 10)
    assert summary["forward_flops"] == _forward_flops(net, (3, 32, 32))
    assert f"{summary['forward_flops'] / 1e6:,.1f} MFLOPs per image" in text


def test_a_bottleneck_width_not_divisible_by_four_is_one_error(raw_params) -> None:
    raw = {
        **raw_params,
        "model": model_section(TINY_CONV, [], 0.0, stages=[residual_stage(6, block="bottleneck")]),
    }
    with pytest.raises(ConvpipeError, match=r"needs filters divisible by 4.*got 6"):
        parse_params(raw)


def test_an_unknown_stage_key_gets_a_did_you_mean(raw_params) -> None:
    raw = {
        **raw_params,
        "model": model_section(TINY_CONV, [], 0.0, stages=[{**residual_stage(8), "blocs": 2}]),
    }
    with pytest.raises(
        ConvpipeError, match=r"model\.stages\[0\]\.blocs.*did you mean 'model\.stages\[0\]\.blocks'"
    ):
        parse_params(raw)


def test_a_residual_classifier_learns_a_separable_problem(make_params) -> None:
    params = make_params()
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    module = CNNClassifier(
        TINY_RESIDUAL,
        train_variant(params, optimizer="adam", lr=0.01, reg_lambda=0.0).model_dump(),
        in_channels=1,
        image_hw=(8, 8),
        num_classes=4,
        train_size=64,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    before = float(module.data_loss(module(x), y).detach())
    trainer(max_steps=60, max_epochs=20).fit(module, loader)
    module.eval()
    after = float(module.data_loss(module(x), y).detach())
    assert after < 0.5 * before


@pytest.mark.parametrize("width", [0.5, 1.5, 3.0])
def test_model_width_scales_every_layer_and_the_shapes_agree_with_the_network(width) -> None:
    stages = [residual_stage(12, 1, 2, block="bottleneck"), residual_stage(10, 1, 1)]
    model = ModelParams.model_validate(
        model_section(TINY_CONV, [20], 0.0, stages=stages, width=width)
    )
    wide = scaled_model(model)
    assert [b.filters for b in wide.conv] == [max(1, round(b.filters * width)) for b in model.conv]
    assert wide.stages[0].filters % 4 == 0  # a bottleneck's inner width stays whole
    assert wide.stages[0].filters == max(4, 4 * round(12 * width / 4))
    assert wide.stages[1].filters == round(10 * width) and wide.hidden == [round(20 * width)]
    assert scaled_model(wide) == wide and wide.width == 1.0  # applied once
    net = build_cnn(model, 3, (16, 16), 5)
    rows = layer_shapes(model, 3, (16, 16), 5)
    assert sum(row.parameters for row in rows) == count_parameters(net)
    assert count_parameters(net) != count_parameters(
        build_cnn(_model(stages=stages), 3, (16, 16), 5)
    )
    # the summary (receptive fields, dense equivalents) reads the same widths
    fields = receptive_fields(model, 3, (16, 16), 5)
    assert [f.name for f in fields] == [r.name for r in rows]


def test_model_width_keeps_a_whitening_first_conv_and_old_checkpoints_mean_one() -> None:
    conv = [dict(TINY_CONV[0], filters=2 * 3 * 2 * 2, kernel=2)]
    model = ModelParams.model_validate(model_section(conv, [8], 0.0, whiten=True, width=2.0))
    assert scaled_model(model).conv[0].filters == 24  # 2 * C * k^2: whitening's fixed count
    build_cnn(model, 3, (8, 8), 3)  # the whitening check passes
    section = _model().model_dump(mode="json")
    del section["width"]  # as written before the key existed
    assert ModelParams.model_validate(section).width == 1.0

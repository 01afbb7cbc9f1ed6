"""Residual blocks and stages (He et al. 2016), built from ``model.stages``.

Two block kinds, each ending in ``activation(branch(x) + shortcut(x))``::

    basic:       conv 3x3/s -> BN -> act -> conv 3x3/1 -> BN
    bottleneck:  conv 1x1 -> BN -> act -> conv 3x3/s -> BN -> act -> conv 1x1 -> BN
                 (the inner width is filters / BOTTLENECK_EXPANSION; the stride sits on the
                 3x3 conv, torchvision's "ResNet v1.5")
    shortcut:    the input itself, or conv 1x1/s -> BN when the stride or the width changes

Every 3x3 conv pads 1 pixel, so a stride ``s`` gives ``ceil(size / s)`` like the conv blocks'
``same`` padding, and so does the 1x1 projection. The last batch norm of each branch starts at
a scale of 0 when ``model.batch_norm_scale`` learns the scales (Goyal et al. 2017): each block
then starts as its shortcut, so a deep stack starts close to the shallow one and trains from
the first step. With fixed scales (``batch_norm_scale: false``) it keeps 1, since a fixed 0
would switch the branch off for good.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from convpipe.config.schema import BOTTLENECK_EXPANSION, ModelParams, ResidualStage

__all__ = ["ResidualBlock", "build_stage"]


def _bn(channels: int, params: ModelParams) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=params.batch_norm_eps, momentum=params.batch_norm_momentum)
    bn.weight.requires_grad_(params.batch_norm_scale)
    return bn


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class ResidualBlock(nn.Module):
    """One residual block: ``act(branch(x) + shortcut(x))``.

    Args:
        stage: The stage it belongs to (kind, output width, activation).
        in_channels: Channels of the input feature map.
        stride: 1, or the stage's stride for its first block.
        params: The ``model`` section (batch-norm momentum, eps, learnt scales).
        activation: Builds the activation module (one per use: some keep no state, but a
            module shared between places would show up twice in a feature-map walk).
    """

    def __init__(
        self,
        stage: ResidualStage,
        in_channels: int,
        stride: int,
        params: ModelParams,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        out = stage.filters
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stage.block == "basic":
            layers["conv1"] = _conv(in_channels, out, 3, stride)
            layers["bn1"] = _bn(out, params)
            layers["act1"] = activation()
            layers["conv2"] = _conv(out, out, 3, 1)
            layers["bn2"] = last = _bn(out, params)
        else:
            width = out // BOTTLENECK_EXPANSION
            layers["conv1"] = _conv(in_channels, width, 1, 1)
            layers["bn1"] = _bn(width, params)
            layers["act1"] = activation()
            layers["conv2"] = _conv(width, width, 3, stride)
            layers["bn2"] = _bn(width, params)
            layers["act2"] = activation()
            layers["conv3"] = _conv(width, out, 1, 1)
            layers["bn3"] = last = _bn(out, params)
        if params.batch_norm_scale:
            nn.init.zeros_(last.weight)
        self.branch = nn.Sequential(layers)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=_conv(in_channels, out, 1, stride), bn=_bn(out, params))
            )
        self.act = activation()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` -> ``(N, filters, ceil(H / s), ceil(W / s))``."""
        return self.act(self.branch(x) + self.shortcut(x))


def build_stage(
    stage: ResidualStage,
    in_channels: int,
    params: ModelParams,
    activation: Callable[[], nn.Module],
) -> nn.Sequential:
    """``stage.blocks`` residual blocks, the first with ``stage.stride``: children ``0, 1, ...``."""
    blocks = nn.Sequential()
    for j in range(stage.blocks):
        stride = stage.stride if j == 0 else 1
        blocks.add_module(str(j), ResidualBlock(stage, in_channels, stride, params, activation))
        in_channels = stage.filters
    return blocks

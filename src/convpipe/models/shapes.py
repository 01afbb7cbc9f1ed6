"""The network's shapes by arithmetic alone, and the checks of the data-derived inputs.

Padding ``same`` follows TensorFlow: the output size is ``ceil(in / stride)`` for any stride,
the extra pixel of an odd total padding going to the bottom/right. Every shape is computed by
plain arithmetic (:func:`layer_shapes`) before a layer is created, so a stack that shrinks the
feature map below 1x1 fails at build time naming the layer and the sizes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from convpipe.config.schema import (
    BOTTLENECK_EXPANSION,
    ConvBlock,
    ModelParams,
    ResidualStage,
    scaled_model,
)
from convpipe.errors import ConvpipeError

__all__ = [
    "ALLOWED_CHANNELS",
    "LayerShape",
    "block_hw",
    "check_inputs",
    "check_num_classes",
    "conv_output_size",
    "is_int",
    "layer_shapes",
    "output_units",
    "same_padding",
]

ALLOWED_CHANNELS = (1, 3)


class LayerShape(NamedTuple):
    """One row of :func:`layer_shapes`.

    Attributes:
        name: Where the layer comes from, e.g. ``model.conv[1]``, ``model.conv[1].pool``,
            ``model.stages[0][1]`` (stage 0, block 1), ``global_pool``, ``flatten``,
            ``model.hidden[0]``, ``output``.
        layer: A short human description, e.g. ``conv 3x3/1 same 1->32 +bn relu``.
        shape: Output shape without the batch dimension: ``(C, H, W)`` or ``(F,)``.
        parameters: Parameters the layer adds (batch-norm scales included, learnt or not).
        flops: Forward FLOPs per image of its convolutions and matrix products (2 per
            multiply-add, as ``torch.utils.flop_counter`` counts; batch norm, activations,
            pooling and additions are not counted).
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    parameters: int
    flops: int


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``same`` padding along one dimension.

    Args:
        size: Input size along the dimension.
        kernel: Kernel size.
        stride: Stride.

    Returns:
        ``(before, after)`` zero padding; ``after`` gets the extra pixel of an odd total.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Output size of a convolution along one dimension.

    Args:
        size: Input size.
        kernel: Kernel size.
        stride: Stride.
        padding: ``same`` (``ceil(size / stride)``) or ``valid``
            (``floor((size - kernel) / stride) + 1``, which is < 1 when the kernel does not fit).

    Returns:
        The output size (may be < 1 for ``valid``; callers check).
    """
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def output_units(num_classes: int) -> int:
    """Units of the output layer: 1 (a sigmoid logit) for 2 classes, else ``num_classes``."""
    check_num_classes(num_classes)
    return 1 if num_classes == 2 else num_classes


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), bools excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_num_classes(num_classes: int) -> None:
    """Refuse a class count a classifier cannot have.

    Raises:
        ConvpipeError: If ``num_classes`` is not an integer >= 2.
    """
    if not is_int(num_classes) or num_classes < 2:
        raise ConvpipeError(
            f"a classifier needs at least 2 classes, got num_classes={num_classes!r}",
            "in the model inputs",
            "check that the prepared data has at least two labels",
        )


def check_inputs(in_channels: int, image_hw: Sequence[int], num_classes: int) -> tuple[int, int]:
    """Validate the data-derived arguments of the network; return ``image_hw`` as a tuple.

    Args:
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        ``(H, W)`` as Python ints.

    Raises:
        ConvpipeError: Naming the first argument that is invalid.
    """
    if not is_int(in_channels) or in_channels not in ALLOWED_CHANNELS:
        raise ConvpipeError(
            f"images must have 1 (grey) or 3 (RGB) channels, got in_channels={in_channels!r}",
            "in the model inputs",
            "set data.channels to 1 or 3 and re-run prepare",
        )
    check_num_classes(num_classes)
    hw = tuple(image_hw) if isinstance(image_hw, Sequence) else ()
    if len(hw) != 2 or not all(is_int(v) and v >= 1 for v in hw):
        raise ConvpipeError(
            f"image_hw must be two positive integers (height, width), got {image_hw!r}",
            "in the model inputs",
            "check data.image_size and the prepared manifest",
        )
    return int(hw[0]), int(hw[1])


def _shrink_error(
    name: str, kind: str, got: tuple[int, int], out: tuple[int, int], image: tuple[int, int]
) -> ConvpipeError:
    return ConvpipeError(
        f"{name} ({kind}) receives a {got[0]}x{got[1]} feature map and would produce "
        f"{out[0]}x{out[1]}",
        f"for {image[0]}x{image[1]} input images, in params model.conv",
        "use a larger data.image_size, or fewer conv blocks or smaller kernel, stride or "
        "pool_size values in model.conv",
    )


def block_hw(
    block: ConvBlock, hw: tuple[int, int], name: str, image: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Feature-map size after the conv of ``block`` and after its pooling.

    Args:
        block: One entry of ``model.conv``.
        hw: The ``(H, W)`` of the feature map the block receives.
        name: The block's place in params, e.g. ``model.conv[1]``, for the error.
        image: The input images' ``(H, W)``, for the error.

    Returns:
        ``(conv_hw, pooled_hw)``; the two are equal when the block does not pool.

    Raises:
        ConvpipeError: If either would be smaller than 1x1.
    """
    conv = tuple(conv_output_size(s, block.kernel, block.stride, block.padding) for s in hw)
    conv_hw = (conv[0], conv[1])
    if min(conv_hw) < 1:
        kind = f"{block.kernel}x{block.kernel} conv, stride {block.stride}, {block.padding}"
        raise _shrink_error(name, kind, hw, conv_hw, image)
    if block.pool == "none":
        return conv_hw, conv_hw
    pooled = (conv_hw[0] // block.pool_size, conv_hw[1] // block.pool_size)
    if min(pooled) < 1:
        kind = f"{block.pool} pooling, pool_size {block.pool_size}"
        raise _shrink_error(f"{name}.pool", kind, conv_hw, pooled, image)
    return conv_hw, pooled


def _conv_parameters(block: ConvBlock, in_channels: int) -> int:
    weights = in_channels * block.filters * block.kernel * block.kernel
    # BatchNorm adds gamma and beta and replaces the conv bias.
    return weights + (2 * block.filters if block.batch_norm else block.filters)


def _conv_label(block: ConvBlock, in_channels: int) -> str:
    k = block.kernel
    bn = " +bn" if block.batch_norm else ""
    return (
        f"conv {k}x{k}/{block.stride} {block.padding} {in_channels}->{block.filters}"
        f"{bn} {block.activation}"
    )


def layer_shapes(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> list[LayerShape]:
    """Per-layer output shapes and parameter counts, by arithmetic alone (no layer is built).

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        One :class:`LayerShape` per conv block, per pooling layer, per residual block, for the
        global pooling, the flatten, per hidden layer and for the output layer, in forward
        order.

    Raises:
        ConvpipeError: If an argument is invalid, or a conv or pooling layer would make the
            feature map smaller than 1x1 (naming the layer, e.g. ``model.conv[2].pool``, and
            the size it receives and would produce).
    """
    params = scaled_model(params)  # model.width applied, as the builder does
    image = hw = check_inputs(in_channels, image_hw, num_classes)
    channels = in_channels
    rows: list[LayerShape] = []
    for i, block in enumerate(params.conv):
        name = f"model.conv[{i}]"
        conv_hw, pooled_hw = block_hw(block, hw, name, image)
        label = _conv_label(block, channels)
        count = _conv_parameters(block, channels)
        flops = _conv_flops(channels, block.filters, block.kernel, conv_hw)
        rows.append(LayerShape(name, label, (block.filters, *conv_hw), count, flops))
        channels, hw = block.filters, pooled_hw
        if block.pool != "none":
            label = f"{block.pool} pool {block.pool_size}x{block.pool_size}"
            rows.append(LayerShape(f"{name}.pool", label, (channels, *hw), 0, 0))
    for i, stage in enumerate(params.stages):
        for j in range(stage.blocks):
            row = residual_block_shape(stage, channels, hw, stage.stride if j == 0 else 1)
            rows.append(row._replace(name=f"model.stages[{i}][{j}]"))
            channels, hw = stage.filters, (row.shape[1], row.shape[2])
    if params.global_pool != "none":
        rows.append(
            LayerShape("global_pool", f"global {params.global_pool} pool", (channels, 1, 1), 0, 0)
        )
        hw = (1, 1)
    features = channels * hw[0] * hw[1]
    rows.append(LayerShape("flatten", "flatten", (features,), 0, 0))
    for j, units in enumerate(params.hidden):
        label = f"linear {features}->{units} relu dropout {params.dropout}"
        count = (features + 1) * units
        rows.append(LayerShape(f"model.hidden[{j}]", label, (units,), count, 2 * features * units))
        features = units
    out = output_units(num_classes)
    drop = f"dropout {params.dropout} " if not params.hidden else ""
    label = f"{drop}linear {features}->{out}"
    rows.append(LayerShape("output", label, (out,), (features + 1) * out, 2 * features * out))
    return rows


def _conv_flops(c_in: int, c_out: int, kernel: int, out_hw: tuple[int, int]) -> int:
    """Forward FLOPs of one convolution: 2 x C_in x k^2 x C_out x H_out x W_out."""
    return 2 * c_in * kernel * kernel * c_out * out_hw[0] * out_hw[1]


Conv = tuple[int, int, int, int]


def residual_convs(
    stage: ResidualStage, in_channels: int, stride: int
) -> tuple[list[Conv], Conv | None]:
    """The convolutions of one residual block, each ``(c_in, c_out, kernel, stride)``.

    Returns:
        The branch's convs in order, and the projection shortcut's (None for an identity
        shortcut). Each conv is followed by a batch norm.
    """
    out = stage.filters
    branch: list[Conv]
    if stage.block == "basic":
        branch = [(in_channels, out, 3, stride), (out, out, 3, 1)]
    else:
        width = out // BOTTLENECK_EXPANSION
        branch = [(in_channels, width, 1, 1), (width, width, 3, stride), (width, out, 1, 1)]
    projection = (in_channels, out, 1, stride) if stride != 1 or in_channels != out else None
    return branch, projection


def residual_block_shape(
    stage: ResidualStage, in_channels: int, hw: tuple[int, int], stride: int
) -> LayerShape:
    """Output shape, parameters and FLOPs of one residual block (named ``residual``)."""
    branch, projection = residual_convs(stage, in_channels, stride)
    count = flops = 0
    size = hw
    for c_in, c_out, kernel, s in branch:
        size = (
            conv_output_size(size[0], kernel, s, "same"),
            conv_output_size(size[1], kernel, s, "same"),
        )
        count += c_in * c_out * kernel * kernel + 2 * c_out  # the conv and its BN
        flops += _conv_flops(c_in, c_out, kernel, size)
    if projection is not None:
        c_in, c_out, kernel, _ = projection
        count += c_in * c_out + 2 * c_out
        flops += _conv_flops(c_in, c_out, kernel, size)
    shortcut = "proj" if projection is not None else "identity"
    label = f"{stage.block} {in_channels}->{stage.filters}/{stride} {shortcut} {stage.activation}"
    return LayerShape("residual", label, (stage.filters, *size), count, flops)

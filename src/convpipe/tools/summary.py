"""``convpipe summary``: the network's layers without training it.

``convpipe summary`` tabulates, per layer of the network ``params.model`` builds for the
prepared data, its output shape, parameters, receptive field and jump, and compares the total
with the fully connected network that replaces every conv layer by a dense one.

Receptive field ``r`` and jump ``j`` (distance in input pixels between adjacent outputs) start
at ``r = j = 1`` on the input image; a conv or pooling layer with kernel ``k`` and stride ``s``
gives ``r_out = r_in + (k - 1) * j_in`` and ``j_out = j_in * s``. Padding shifts the field but
does not change its size. A residual block's field is its branch's (the longest path: the
shortcut sees less); global pooling sees the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from convpipe.config.schema import ModelParams, scaled_model
from convpipe.data.manifest import Manifest
from convpipe.models.shapes import conv_output_size, layer_shapes, residual_convs


class LayerField(NamedTuple):
    """One row of :func:`receptive_fields`: a :class:`~convpipe.models.shapes.LayerShape` and more.

    Attributes:
        name: Where the layer comes from, e.g. ``model.conv[0].pool``.
        layer: A short human description.
        shape: Output shape without the batch dimension: ``(C, H, W)`` or ``(F,)``.
        parameters: Parameters of the layer.
        flops: Forward FLOPs per image (see :class:`~convpipe.models.shapes.LayerShape`).
        receptive_field: Side in input pixels of the window one output unit sees; None for
            flatten and dense layers (they see the whole image).
        jump: Input pixels between adjacent output units (cumulative stride); None as above.
        dense_parameters: Parameters of the layer in the fully connected equivalent: for a conv
            layer ``in_C*in_H*in_W * out_C*out_H*out_W + out_C*out_H*out_W`` (weights and one
            bias per output unit; a residual block: the sum over its convs), else
            ``parameters``.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    parameters: int
    flops: int
    receptive_field: int | None
    jump: int | None
    dense_parameters: int


def _conv_dense(c_in: int, in_hw: tuple[int, int], c_out: int, out_hw: tuple[int, int]) -> int:
    """A conv as a dense layer: every input unit to every output unit, one bias per output."""
    units = c_out * out_hw[0] * out_hw[1]
    return c_in * in_hw[0] * in_hw[1] * units + units


class _Window(NamedTuple):
    """A windowed layer: its ``(kernel, stride)`` steps in order, and its dense equivalent."""

    steps: list[tuple[int, int]]
    dense: int | None  # None: not a conv (pooling keeps its own parameter count)


def _windows(
    params: ModelParams, in_channels: int, image_hw: tuple[int, int]
) -> dict[str, _Window]:
    """Every conv, pooling and residual layer by name, with its steps and dense equivalent."""
    params = scaled_model(params)  # the widths layer_shapes reports
    windows: dict[str, _Window] = {}
    channels, hw = in_channels, image_hw
    for row in layer_shapes(params, in_channels, image_hw, 2):
        if row.name.startswith("model.conv") and row.name.endswith(".pool"):
            block = params.conv[int(row.name.split("[")[1].split("]")[0])]
            windows[row.name] = _Window([(block.pool_size, block.pool_size)], None)
        elif row.name.startswith("model.conv"):
            block = params.conv[int(row.name.split("[")[1].split("]")[0])]
            dense = _conv_dense(channels, hw, row.shape[0], (row.shape[1], row.shape[2]))
            windows[row.name] = _Window([(block.kernel, block.stride)], dense)
        elif row.name.startswith("model.stages"):
            windows[row.name] = _residual_window(params, row.name, channels, hw)
        else:
            break
        channels, hw = row.shape[0], (row.shape[1], row.shape[2])
    return windows


def _residual_window(params: ModelParams, name: str, channels: int, hw: tuple[int, int]) -> _Window:
    """The steps and dense equivalent of residual block ``model.stages[i][j]``."""
    i, j = (int(part.rstrip("]")) for part in name.removeprefix("model.stages[").split("]["))
    stage = params.stages[i]
    branch, projection = residual_convs(stage, channels, stage.stride if j == 0 else 1)
    dense = 0
    size = hw
    for c_in, c_out, kernel, stride in branch:
        out = (
            conv_output_size(size[0], kernel, stride, "same"),
            conv_output_size(size[1], kernel, stride, "same"),
        )
        dense += _conv_dense(c_in, size, c_out, out)
        size = out
    if projection is not None:
        dense += _conv_dense(channels, hw, stage.filters, size)
    return _Window([(k, s) for _, _, k, s in branch], dense)


def receptive_fields(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> list[LayerField]:
    """Per-layer shapes, parameters, FLOPs, receptive fields, jumps, dense equivalents.

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        One :class:`LayerField` per row of :func:`convpipe.models.shapes.layer_shapes`, in forward
        order.

    Raises:
        ConvpipeError: As :func:`convpipe.models.shapes.layer_shapes` (bad inputs, a stack that
            shrinks the image below 1x1).
    """
    rows = layer_shapes(params, in_channels, image_hw, num_classes)
    windows = _windows(params, in_channels, (int(image_hw[0]), int(image_hw[1])))
    field, jump = 1, 1
    out: list[LayerField] = []
    for row in rows:
        window = windows.get(row.name)
        if window is None:
            out.append(LayerField(*row, None, None, row.parameters))
        else:
            for kernel, stride in window.steps:
                field += (kernel - 1) * jump
                jump *= stride
            dense = row.parameters if window.dense is None else window.dense
            out.append(LayerField(*row, field, jump, dense))
    return out


def dense_equivalent_parameters(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> int:
    """Parameters of the network with every conv layer replaced by a dense layer.

    Each conv layer becomes a fully connected layer from its input volume ``(C, H, W)`` to its
    output volume ``(C', H', W')`` with one bias per output unit (batch-norm parameters are
    not counted for it); pooling, hidden and output layers are kept as they are.

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).

    Returns:
        The total parameter count of that fully connected network.
    """
    rows = receptive_fields(params, in_channels, image_hw, num_classes)
    return sum(row.dense_parameters for row in rows)


def summary_dict(params: ModelParams, manifest: Manifest) -> dict[str, Any]:
    """The summary of the network ``params`` builds for the prepared data, as plain data.

    Args:
        params: The ``model`` section.
        manifest: The prepared data's manifest (channels, image size, classes).

    Returns:
        ``{"input": [C, H, W], "num_classes", "layers": [...], "total_parameters",
        "forward_flops", "dense_equivalent_parameters", "ratio"}``; ``forward_flops`` is per
        image, ``ratio`` is dense-equivalent / total.
    """
    hw = manifest.image_hw
    rows = receptive_fields(params, manifest.channels, hw, manifest.num_classes)
    total = sum(row.parameters for row in rows)
    dense = sum(row.dense_parameters for row in rows)
    return {
        "input": [manifest.channels, *hw],
        "num_classes": manifest.num_classes,
        "layers": [row._asdict() | {"shape": list(row.shape)} for row in rows],
        "total_parameters": total,
        "forward_flops": sum(row.flops for row in rows),
        "dense_equivalent_parameters": dense,
        "ratio": dense / total,
    }


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: left-aligned columns two spaces apart, a dashed rule under the header.

    Args:
        headers: Column titles.
        rows: Cells, each row at most ``len(headers)`` long (shorter rows leave cells empty).

    Returns:
        The table, one line per row plus two header lines.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [headers, ["-" * w for w in widths], *rows]
    return "".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() + "\n"
        for line in lines
    )


def _fmt(value: int | None) -> str:
    return "image" if value is None else f"{value:,}"


def format_summary(summary: dict[str, Any]) -> str:
    """Render :func:`summary_dict` as the ``convpipe summary`` table."""
    headers = ["layer", "description", "output", "params", "MFLOPs", "rf", "jump", "dense-equiv"]
    rows = [
        [
            layer["name"],
            layer["layer"],
            "x".join(map(str, layer["shape"])),
            f"{layer['parameters']:,}",
            f"{layer['flops'] / 1e6:,.2f}",
            _fmt(layer["receptive_field"]),
            "-" if layer["jump"] is None else str(layer["jump"]),
            f"{layer['dense_parameters']:,}",
        ]
        for layer in summary["layers"]
    ]
    c, h, w = summary["input"]
    return (
        f"input {c}x{h}x{w}, {summary['num_classes']} classes\n"
        + render_table(headers, rows)
        + f"total parameters: {summary['total_parameters']:,}\n"
        + f"forward pass: {summary['forward_flops'] / 1e6:,.1f} MFLOPs per image "
        + "(convolutions and matrix products; training costs about 3x)\n"
        + "fully connected equivalent (conv layers as dense layers): "
        + f"{summary['dense_equivalent_parameters']:,} parameters, "
        + f"{summary['ratio']:,.1f}x as many\n"
    )

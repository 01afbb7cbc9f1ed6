"""The CNN built from ``params.model``: its layers, its weight penalty, its probabilities.

Architecture (one row per entry of ``model.conv``, then the fully connected head)::

    input (N, C, H, W), C in {1, 3}, already normalised
    model.conv[i]:      [ZeroPad2d] -> Conv2d -> [BatchNorm2d] -> activation -> [Max|AvgPool2d]
                        (pool_before_norm: [ZeroPad2d] -> Conv2d -> [pool] -> [BN] -> activation)
    model.stages[i]:    residual blocks (:mod:`convpipe.models.residual`)
    global_pool:        avg | max over H and W, (N, C, 1, 1) (none: the whole map is flattened)
    flatten:            (N, F)
    model.hidden[j]:    Linear -> ReLU -> Dropout(model.dropout)
    (no hidden layer):  Dropout(model.dropout)
    output:             Linear [x model.output_scale] -> (N, 1) for 2 classes (sigmoid / BCE),
                                                         (N, K) otherwise (softmax / CE)

Every shape is known before a layer is built (:mod:`convpipe.models.shapes`), so a stack that
does not fit the image size fails naming the layer.

Regularisation is the course's explicit penalty ``(lambda / m) * sum|w|`` (L1) or
``(lambda / m) * sum w^2`` (L2) over the weights of conv and linear layers, where ``m`` is the
training-set size; optimisers get no ``weight_decay``, so the penalty is the only one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import get_args

import torch
from torch import Tensor, nn

from convpipe.config.schema import ConvBlock, ModelParams, RegType, scaled_model
from convpipe.errors import ConvpipeError
from convpipe.io import memory_bytes
from convpipe.models.residual import build_stage
from convpipe.models.shapes import (
    LayerShape,
    block_hw,
    check_inputs,
    check_num_classes,
    is_int,
    layer_shapes,
    output_units,
    same_padding,
)
from convpipe.models.whitening import check_whitening, freeze_whitening

__all__ = [
    "BACKBONE",
    "REG_TYPES",
    "backbone_parameters",
    "build_cnn",
    "count_parameters",
    "probabilities",
    "regularization_penalty",
]

REG_TYPES: tuple[str, ...] = get_args(RegType)  # the schema's train.reg_type values

# fp32: the bytes of each weight a network is built with (training adds gradients and the
# optimiser's state; the size check bounds what building the network alone allocates)
BYTES_PER_WEIGHT = 4
#: The network's backbone: the conv blocks and residual stages (``net.features``), what
#: fine-tuning freezes (``train.freeze_epochs``) and trains slower (``train.backbone_lr_scale``);
#: the rest, ``net.classifier``, is the head.
BACKBONE = "features"

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_POOLS: dict[str, Callable[[int], nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
_GLOBAL_POOLS: dict[str, Callable[[], nn.Module]] = {
    "avg": lambda: nn.AdaptiveAvgPool2d(1),
    "max": lambda: nn.AdaptiveMaxPool2d(1),
}
_PENALISED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _conv_block(
    block: ConvBlock, in_channels: int, hw: tuple[int, int], params: ModelParams
) -> nn.Sequential:
    """One conv block as ``Sequential(pad?, conv, bn?, act, pool?)`` for an input of size ``hw``.

    Batch norm takes ``model.batch_norm_momentum`` and ``model.batch_norm_eps``, and learns its
    scale only under ``model.batch_norm_scale``. With ``model.pool_before_norm`` the pool comes
    right after the conv (``pad?, conv, pool?, bn?, act``): a max pool then picks the same
    values wherever the rest of the block is increasing (BN with a positive scale, ReLU), and
    the norm and activation work on 1/pool_size^2 of the pixels (an average pool then
    averages before the activation instead of after). ``model.conv_init: dirac``
    sets the first ``min(C_in, C_out)`` filters to the identity (the rest keep torch's
    default): a deep stack then starts close to passing its input through.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    padding: tuple[int, int] = (0, 0)
    if block.padding == "same":
        top, bottom = same_padding(hw[0], block.kernel, block.stride)
        left, right = same_padding(hw[1], block.kernel, block.stride)
        if (top, left) == (bottom, right):
            padding = (top, left)
        else:
            layers["pad"] = nn.ZeroPad2d((left, right, top, bottom))
    layers["conv"] = conv = nn.Conv2d(
        in_channels,
        block.filters,
        kernel_size=block.kernel,
        stride=block.stride,
        padding=padding,
        bias=not block.batch_norm,
    )
    if params.conv_init == "dirac":
        with torch.no_grad():
            nn.init.dirac_(conv.weight[: min(in_channels, block.filters)])
    pool = _POOLS[block.pool](block.pool_size) if block.pool != "none" else None
    if pool is not None and params.pool_before_norm:
        layers["pool"] = pool
    if block.batch_norm:
        layers["bn"] = bn = nn.BatchNorm2d(
            block.filters, eps=params.batch_norm_eps, momentum=params.batch_norm_momentum
        )
        bn.weight.requires_grad_(params.batch_norm_scale)
    layers["act"] = _ACTIVATIONS[block.activation]()
    if pool is not None and not params.pool_before_norm:
        layers["pool"] = pool
    return nn.Sequential(layers)


class Scale(nn.Module):
    """Multiplies its input by a constant (``model.output_scale`` on the logits)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        """``factor * x``, any shape."""
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def _classifier(params: ModelParams, features: int, num_classes: int) -> nn.Sequential:
    """[Global pool], flatten, hidden ``Linear -> ReLU -> Dropout`` layers, then the output."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if params.global_pool != "none":
        layers["pool"] = _GLOBAL_POOLS[params.global_pool]()
    layers["flatten"] = nn.Flatten()
    for j, units in enumerate(params.hidden):
        layers[f"fc{j}"] = nn.Linear(features, units)
        layers[f"relu{j}"] = nn.ReLU()
        layers[f"drop{j}"] = nn.Dropout(params.dropout)
        features = units
    if not params.hidden:
        # The output layer always gets dropped-out inputs, so model.dropout never goes unused.
        layers["drop"] = nn.Dropout(params.dropout)
    layers["out"] = nn.Linear(features, output_units(num_classes))
    if params.output_scale != 1.0:
        layers["scale"] = Scale(params.output_scale)
    return nn.Sequential(layers)


def check_size(rows: Sequence[LayerShape], memory: int | None = None) -> None:
    """Refuse a network whose fp32 weights would take more than half this machine's memory.

    Counted from the shapes alone, before any tensor exists: a checkpoint or a params file
    asking for enormous layers ends in one line instead of a terabyte allocation.

    Raises:
        ConvpipeError: naming the largest layer and the sizes.
    """
    memory = memory_bytes() if memory is None else memory
    total = sum(row.parameters for row in rows)
    need = total * BYTES_PER_WEIGHT
    if memory and need > memory // 2:
        largest = max(rows, key=lambda row: row.parameters)
        raise ConvpipeError(
            f"the network would have {total:,} parameters ({need / 2**30:.1f} GiB of fp32 "
            f"weights, more than half of this machine's {memory / 2**30:.1f} GiB); the largest "
            f"layer is {largest.name} ({largest.layer}, {largest.parameters:,})",
            "in the model section (params.yaml or the checkpoint's hyperparameters)",
            "use fewer filters or hidden units, or global pooling instead of a large flatten",
        )


def build_cnn(
    params: ModelParams, in_channels: int, image_hw: Sequence[int], num_classes: int
) -> nn.Sequential:
    """Build the CNN described by ``params``.

    Args:
        params: The ``model`` section.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``; fixed, since ``same`` padding for stride > 1 and the first
            linear layer depend on it.
        num_classes: Number of classes K (>= 2).

    Returns:
        ``Sequential(features=..., classifier=...)`` mapping a float ``(N, C, H, W)`` batch to
        logits ``(N, 1)`` when K == 2, else ``(N, K)``. ``features[i]`` is ``model.conv[i]``
        with children ``pad`` (only for asymmetric ``same`` padding), ``conv``, ``bn`` (only
        with batch_norm), ``act``, ``pool`` (unless ``none``); ``features.stage<i>`` is
        ``model.stages[i]``, its residual blocks as children ``0, 1, ...``. ``classifier``
        starts with ``pool`` (global pooling) unless ``model.global_pool`` is ``none``.

    Raises:
        ConvpipeError: If an argument is invalid, a layer would shrink the feature map below
            1x1 (see :func:`layer_shapes`), ``model.whiten`` has the wrong filter count, or
            the weights would not fit in memory (:func:`check_size`).
    """
    params = scaled_model(params)  # model.width applied, as layer_shapes does
    rows = layer_shapes(params, in_channels, image_hw, num_classes)
    check_size(rows)
    image = hw = check_inputs(in_channels, image_hw, num_classes)
    check_whitening(params, in_channels)
    features = nn.Sequential()
    channels = in_channels
    for i, block in enumerate(params.conv):
        features.add_module(str(i), _conv_block(block, channels, hw, params))
        hw = block_hw(block, hw, f"model.conv[{i}]", image)[1]
        channels = block.filters
    for i, stage in enumerate(params.stages):
        features.add_module(
            f"stage{i}", build_stage(stage, channels, params, _ACTIVATIONS[stage.activation])
        )
        channels = stage.filters
    flat = next(row.shape[0] for row in rows if row.name == "flatten")
    classifier = _classifier(params, flat, num_classes)
    net = nn.Sequential(OrderedDict(features=features, classifier=classifier))
    freeze_whitening(net, params)
    return net


def backbone_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``net``'s backbone (:data:`BACKBONE`); none for another network."""
    backbone = getattr(net, BACKBONE, None)
    return list(backbone.parameters()) if isinstance(backbone, nn.Module) else []


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (buffers such as BN running stats excluded).

    Args:
        module: Any module.
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        The total number of scalars.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def regularization_penalty(module: nn.Module, reg_type: str, reg_lambda: float, m: int) -> Tensor:
    """The course's weight penalty, scaled by ``lambda / m``.

    ``l1``: ``(lambda / m) * sum |w|``; ``l2``: ``(lambda / m) * sum w^2``; ``none``: 0. The sum
    runs over the trained ``weight`` of every conv and linear layer; biases, BatchNorm
    parameters and fixed (whitening) filters are not penalised. Added to each mini-batch's
    mean data loss, it makes the per-batch objective an unbiased estimate of the full-batch
    course objective ``J + penalty``.

    Args:
        module: The network.
        reg_type: ``none``, ``l1`` or ``l2``.
        reg_lambda: lambda >= 0.
        m: Training-set size (> 0).

    Returns:
        A scalar tensor (differentiable w.r.t. the weights unless it is the constant 0).

    Raises:
        ConvpipeError: For an unknown ``reg_type``, a negative ``reg_lambda`` or ``m`` < 1.
    """
    _check_penalty_args(reg_type, reg_lambda, m)
    weights = [
        mod.weight
        for mod in module.modules()
        if isinstance(mod, _PENALISED) and mod.weight.requires_grad  # not fixed whitening
    ]
    if reg_type == "none" or reg_lambda == 0 or not weights:
        ref = next(module.parameters(), None)
        if ref is None:
            return torch.zeros(())
        return torch.zeros((), device=ref.device, dtype=ref.dtype)
    if reg_type == "l1":
        total = torch.stack([w.abs().sum() for w in weights]).sum()
    else:
        total = torch.stack([w.pow(2).sum() for w in weights]).sum()
    return total * (reg_lambda / m)


def _check_penalty_args(reg_type: str, reg_lambda: float, m: int) -> None:
    if reg_type not in REG_TYPES:
        raise ConvpipeError(
            f"unknown regularisation '{reg_type}'", "at train.reg_type", "use none, l1 or l2"
        )
    if reg_lambda < 0:
        raise ConvpipeError(
            f"the regularisation strength must be >= 0, got {reg_lambda}",
            "at train.reg_lambda",
            "use 0 or a positive value",
        )
    if not is_int(m) or m < 1:
        raise ConvpipeError(
            f"the training-set size m must be a positive integer, got {m!r}",
            "for the lambda/m penalty",
            "check that the train split is not empty",
        )


def probabilities(logits: Tensor, num_classes: int) -> Tensor:
    """Class probabilities from the network's logits.

    Args:
        logits: ``(N,)`` or ``(N, 1)`` for 2 classes, ``(N, K)`` otherwise.
        num_classes: K (>= 2).

    Returns:
        ``(N, K)`` probabilities that sum to 1 per row; for 2 classes ``[1 - p, p]`` with
        ``p = sigmoid(logit)`` the probability of class 1.

    Raises:
        ValueError: If the logits' shape does not match ``num_classes``.
    """
    check_num_classes(num_classes)
    if num_classes == 2:
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 1:
            raise ValueError(f"binary logits must be (N,) or (N, 1), got {tuple(logits.shape)}")
        p = torch.sigmoid(logits)
        return torch.stack([1 - p, p], dim=1)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (N, {num_classes}), got {tuple(logits.shape)}")
    return torch.softmax(logits, dim=1)

"""The CNN built from ``params.model`` and the LightningModule that trains it.

Architecture (one row per entry of ``model.conv``, then the fully connected head)::

    input (N, C, H, W), C in {1, 3}, already normalised
    model.conv[i]:      [ZeroPad2d] -> Conv2d -> [BatchNorm2d] -> activation -> [Max|AvgPool2d]
    flatten:            (N, F)
    model.hidden[j]:    Linear -> ReLU -> Dropout(model.dropout)
    (no hidden layer):  Dropout(model.dropout)
    output:             Linear -> (N, 1) for 2 classes (sigmoid / BCE),
                                  (N, K) otherwise (softmax / CE)

Padding ``same`` follows TensorFlow: the output size is ``ceil(in / stride)`` for any stride,
the extra pixel of an odd total padding going to the bottom/right. Every shape is computed by
plain arithmetic (:func:`layer_shapes`) before a layer is created, so a stack that shrinks the
feature map below 1x1 fails at build time naming the layer and the sizes.

Regularisation is the course's explicit penalty ``(lambda / m) * sum|w|`` (L1) or
``(lambda / m) * sum w^2`` (L2) over the weights of conv and linear layers, where ``m`` is the
training-set size; optimisers get no ``weight_decay``, so the penalty is the only one.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRScheduler
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from convpipe.config import ConvBlock, ModelParams, RuntimeParams, TrainParams
from convpipe.config import _describe as _describe_validation_error
from convpipe.errors import ConvpipeError

__all__ = [
    "CNNClassifier",
    "LayerShape",
    "build_cnn",
    "build_optimizer",
    "build_scheduler",
    "conv_output_size",
    "count_parameters",
    "cpu_threads",
    "layer_shapes",
    "output_units",
    "probabilities",
    "regularization_penalty",
    "same_padding",
]

SPLITS = ("train", "val", "test")
ALLOWED_CHANNELS = (1, 3)
REG_TYPES = ("none", "l1", "l2")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_POOLS: dict[str, Callable[[int], nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
_PENALISED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# torch's own thread default at import (the cores, or OMP_NUM_THREADS): what runtime.threads
# "auto" shares out, even after something in this process changed the current setting.
_DEFAULT_THREADS = torch.get_num_threads()

_Schema = TypeVar("_Schema", bound=BaseModel)


class LayerShape(NamedTuple):
    """One row of :func:`layer_shapes`.

    Attributes:
        name: Where the layer comes from, e.g. ``model.conv[1]``, ``model.conv[1].pool``,
            ``flatten``, ``model.hidden[0]``, ``output``.
        layer: A short human description, e.g. ``conv 3x3/1 same 1->32 +bn relu``.
        shape: Output shape without the batch dimension: ``(C, H, W)`` or ``(F,)``.
        parameters: Trainable parameters the layer adds.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    parameters: int


# --------------------------------------------------------------------------- shape arithmetic


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
    _check_num_classes(num_classes)
    return 1 if num_classes == 2 else num_classes


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), bools excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_num_classes(num_classes: int) -> None:
    if not _is_int(num_classes) or num_classes < 2:
        raise ConvpipeError(
            f"a classifier needs at least 2 classes, got num_classes={num_classes!r}",
            "in the model inputs",
            "check that the prepared data has at least two labels",
        )


def _check_inputs(in_channels: int, image_hw: Sequence[int], num_classes: int) -> tuple[int, int]:
    """Validate the data-derived arguments of :func:`build_cnn`; return ``image_hw`` as a tuple."""
    if not _is_int(in_channels) or in_channels not in ALLOWED_CHANNELS:
        raise ConvpipeError(
            f"images must have 1 (grey) or 3 (RGB) channels, got in_channels={in_channels!r}",
            "in the model inputs",
            "set data.channels to 1 or 3 and re-run prepare",
        )
    _check_num_classes(num_classes)
    hw = tuple(image_hw) if isinstance(image_hw, Sequence) else ()
    if len(hw) != 2 or not all(_is_int(v) and v >= 1 for v in hw):
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


def _block_hw(
    block: ConvBlock, hw: tuple[int, int], name: str, image: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Feature-map size after the conv of ``block`` and after its pooling.

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
        One :class:`LayerShape` per conv block, per pooling layer, for the flatten, per
        hidden layer and for the output layer, in forward order.

    Raises:
        ConvpipeError: If an argument is invalid, or a conv or pooling layer would make the
            feature map smaller than 1x1 (naming the layer, e.g. ``model.conv[2].pool``, and
            the size it receives and would produce).
    """
    image = hw = _check_inputs(in_channels, image_hw, num_classes)
    channels = in_channels
    rows: list[LayerShape] = []
    for i, block in enumerate(params.conv):
        name = f"model.conv[{i}]"
        conv_hw, pooled_hw = _block_hw(block, hw, name, image)
        label = _conv_label(block, channels)
        count = _conv_parameters(block, channels)
        rows.append(LayerShape(name, label, (block.filters, *conv_hw), count))
        channels, hw = block.filters, pooled_hw
        if block.pool != "none":
            label = f"{block.pool} pool {block.pool_size}x{block.pool_size}"
            rows.append(LayerShape(f"{name}.pool", label, (channels, *hw), 0))
    features = channels * hw[0] * hw[1]
    rows.append(LayerShape("flatten", "flatten", (features,), 0))
    for j, units in enumerate(params.hidden):
        label = f"linear {features}->{units} relu dropout {params.dropout}"
        rows.append(LayerShape(f"model.hidden[{j}]", label, (units,), (features + 1) * units))
        features = units
    out = output_units(num_classes)
    drop = f"dropout {params.dropout} " if not params.hidden else ""
    label = f"{drop}linear {features}->{out}"
    rows.append(LayerShape("output", label, (out,), (features + 1) * out))
    return rows


# --------------------------------------------------------------------------- network


def _conv_block(block: ConvBlock, in_channels: int, hw: tuple[int, int]) -> nn.Sequential:
    """One conv block as ``Sequential(pad?, conv, bn?, act, pool?)`` for an input of size ``hw``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    padding: tuple[int, int] = (0, 0)
    if block.padding == "same":
        top, bottom = same_padding(hw[0], block.kernel, block.stride)
        left, right = same_padding(hw[1], block.kernel, block.stride)
        if (top, left) == (bottom, right):
            padding = (top, left)
        else:
            layers["pad"] = nn.ZeroPad2d((left, right, top, bottom))
    layers["conv"] = nn.Conv2d(
        in_channels,
        block.filters,
        kernel_size=block.kernel,
        stride=block.stride,
        padding=padding,
        bias=not block.batch_norm,
    )
    if block.batch_norm:
        layers["bn"] = nn.BatchNorm2d(block.filters)
    layers["act"] = _ACTIVATIONS[block.activation]()
    if block.pool != "none":
        layers["pool"] = _POOLS[block.pool](block.pool_size)
    return nn.Sequential(layers)


def _classifier(params: ModelParams, features: int, num_classes: int) -> nn.Sequential:
    """Flatten, hidden ``Linear -> ReLU -> Dropout`` layers, then the output ``Linear``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for j, units in enumerate(params.hidden):
        layers[f"fc{j}"] = nn.Linear(features, units)
        layers[f"relu{j}"] = nn.ReLU()
        layers[f"drop{j}"] = nn.Dropout(params.dropout)
        features = units
    if not params.hidden:
        # The output layer always gets dropped-out inputs, so model.dropout never goes unused.
        layers["drop"] = nn.Dropout(params.dropout)
    layers["out"] = nn.Linear(features, output_units(num_classes))
    return nn.Sequential(layers)


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
        with batch_norm), ``act``, ``pool`` (unless ``none``).

    Raises:
        ConvpipeError: If an argument is invalid or a layer would shrink the feature map below
            1x1 (see :func:`layer_shapes`).
    """
    rows = layer_shapes(params, in_channels, image_hw, num_classes)
    image = hw = _check_inputs(in_channels, image_hw, num_classes)
    features = nn.Sequential()
    channels = in_channels
    for i, block in enumerate(params.conv):
        features.add_module(str(i), _conv_block(block, channels, hw))
        hw = _block_hw(block, hw, f"model.conv[{i}]", image)[1]
        channels = block.filters
    flat = next(row.shape[0] for row in rows if row.name == "flatten")
    classifier = _classifier(params, flat, num_classes)
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


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
    runs over the ``weight`` of every conv and linear layer; biases and BatchNorm parameters
    are not penalised. Added to each mini-batch's mean data loss, it makes the per-batch
    objective an unbiased estimate of the full-batch course objective ``J + penalty``.

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
    weights = [mod.weight for mod in module.modules() if isinstance(mod, _PENALISED)]
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
    if not _is_int(m) or m < 1:
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
    _check_num_classes(num_classes)
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


# --------------------------------------------------------------------------- optimisation


def _check_optimizer(train: TrainParams) -> None:
    if train.optimizer == "nesterov" and train.momentum <= 0:
        raise ConvpipeError(
            f"train.optimizer nesterov needs a momentum > 0, got train.momentum={train.momentum}",
            "in params train",
            "set train.momentum (e.g. 0.9) or use train.optimizer sgd",
        )


def build_optimizer(
    parameters: Iterable[nn.Parameter], train: TrainParams
) -> torch.optim.Optimizer:
    """The optimiser named by ``train.optimizer``, with no ``weight_decay``.

    Regularisation is the explicit lambda/m penalty, so AdamW gets ``weight_decay=0`` (its
    default 0.01 would add a second, hidden regulariser) and then behaves like Adam.

    Args:
        parameters: The parameters to optimise.
        train: The ``train`` section (``optimizer``, ``lr``, ``momentum``).

    Returns:
        ``sgd``: SGD(lr); ``momentum``: SGD(lr, momentum); ``nesterov``: SGD(lr, momentum,
        nesterov=True); ``adam``: Adam(lr); ``adamw``: AdamW(lr, weight_decay=0).

    Raises:
        ConvpipeError: For ``nesterov`` with ``momentum`` 0 (PyTorch rejects it).
    """
    _check_optimizer(train)
    name, lr = train.optimizer, train.lr
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    if name in ("momentum", "nesterov"):
        nesterov = name == "nesterov"
        return torch.optim.SGD(parameters, lr=lr, momentum=train.momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainParams, total_steps: int | None = None
) -> LRSchedulerConfigType | None:
    """The learning-rate scheduler named by ``train.scheduler``.

    Stepped once per epoch: ``cosine``: CosineAnnealingLR over ``train.max_epochs``; ``step``:
    StepLR with ``step_size = max(1, max_epochs // 3)`` and gamma 0.1; ``plateau``:
    ReduceLROnPlateau on ``train.monitor`` in ``train.monitor_mode`` with factor 0.1 and
    ``patience = max(1, train.patience // 2)`` (so it can act before early stopping does).

    Stepped once per batch: ``onecycle``: OneCycleLR over ``total_steps``, warming up from
    ``lr / 25`` to ``train.lr`` in the first 30 % of the steps, then annealing (cosine) to
    ``lr / 2.5e5`` after the last step. Momentum is not cycled, so ``train.momentum`` (and
    Adam's betas) stay as configured and plain ``sgd`` stays plain.

    Args:
        optimizer: The optimiser to schedule.
        train: The ``train`` section.
        total_steps: Optimiser steps of the whole training; ``onecycle`` needs it.

    Returns:
        A Lightning scheduler config dict, or None for ``none``.

    Raises:
        ValueError: For ``onecycle`` without a positive ``total_steps``.
    """
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    if train.scheduler == "none":
        return None
    if train.scheduler == "onecycle":
        if not total_steps or total_steps < 1:
            raise ValueError(f"onecycle needs the number of training steps, got {total_steps!r}")
        # One step more than training takes: Lightning (like most loops) steps the scheduler
        # after the last optimiser step too, which would take OneCycleLR past its end and
        # back up to a high learning rate.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=train.lr, total_steps=int(total_steps) + 1, cycle_momentum=False
        )
        return {"scheduler": scheduler, "interval": "step", "frequency": 1}
    if train.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_epochs)
    elif train.scheduler == "step":
        step_size = max(1, train.max_epochs // 3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=train.monitor_mode, factor=0.1, patience=max(1, train.patience // 2)
        )
        return {"scheduler": scheduler, "monitor": train.monitor, "interval": "epoch"}
    return {"scheduler": scheduler, "interval": "epoch", "frequency": 1}


# --------------------------------------------------------------------------- LightningModule


def _parse_section(schema: type[_Schema], value: Any, section: str) -> _Schema:
    """Re-validate a params section given as a plain mapping (or the schema object itself)."""
    if isinstance(value, schema):
        return value
    if not isinstance(value, Mapping):
        raise ConvpipeError(
            f"the '{section}' hyperparameter must be a mapping, got {type(value).__name__}",
            "in CNNClassifier(...)",
            f"pass params.{section}.model_dump()",
        )
    try:
        return schema.model_validate(dict(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        error = {**first, "loc": (section, *first["loc"])}
        raise _describe_validation_error(error, "the model hyperparameters") from None


# Checkpoints written before the runtime section existed stored its keys under `train`; they
# say how that training ran, not what it learnt, so loading one drops them.
_RUNTIME_KEYS = frozenset(RuntimeParams.model_fields)


def _without_runtime_keys(train: Any) -> Any:
    """``train`` without the keys that moved to the ``runtime`` section."""
    if isinstance(train, Mapping):
        return {key: value for key, value in train.items() if key not in _RUNTIME_KEYS}
    return train


def _check_train_size(train_size: int) -> None:
    if not _is_int(train_size) or train_size < 1:
        raise ConvpipeError(
            f"train_size must be a positive integer, got {train_size!r}",
            "in CNNClassifier(...)",
            "pass the number of training images (the m of the lambda/m penalty)",
        )


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ConvpipeError(
            f"got {len(names)} class names for {num_classes} classes",
            "in CNNClassifier(...)",
            "pass one name per class, in label order",
        )
    return names


def _accuracy(num_classes: int) -> Metric:
    # validate_args would check every batch's labels (a torch.unique per step); the labels
    # come from a validated manifest and the logits from this network, so skip the check.
    if num_classes == 2:
        return BinaryAccuracy(validate_args=False)
    return MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)


def cpu_threads(setting: int | str, processes: int) -> int:
    """The intra-op CPU threads one training process should use.

    Args:
        setting: ``runtime.threads``: a number, or ``auto``.
        processes: Training processes sharing this machine (``train.devices``).

    Returns:
        ``setting`` itself if it is a number; for ``auto``, torch's default (this machine's
        cores, or ``OMP_NUM_THREADS``) shared out over ``processes``, at least 1, so DDP
        processes on one CPU do not oversubscribe it.
    """
    if setting != "auto":
        return int(setting)
    cores = _DEFAULT_THREADS
    if hasattr(os, "sched_getaffinity"):  # a container may allow fewer CPUs than torch saw
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores // max(1, processes))


class CNNClassifier(L.LightningModule):
    """The CNN of :func:`build_cnn`, trained with the lambda/m penalty and logged per split.

    Logged keys (all epoch-level): ``train/loss`` (data loss J), ``train/penalty``,
    ``train/objective`` (J + penalty, what is minimised), ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/count``, ``test/loss``, ``test/acc``, ``test/count`` (images evaluated,
    summed over DDP ranks).

    ``hparams`` (plain data, so checkpoints reload with ``weights_only=True``)::

        model: dict         # ModelParams.model_dump(mode="json")
        train: dict         # TrainParams.model_dump(mode="json")
        in_channels: int
        image_hw: [H, W]
        num_classes: int
        train_size: int     # m of the lambda/m penalty
        class_names: list[str] | None

    Args:
        model: The ``model`` section as a mapping (``params.model.model_dump()``); a
            :class:`ModelParams` is accepted too and stored as a mapping.
        train: The ``train`` section, likewise.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).
        train_size: Training-set size m (> 0).
        class_names: Optional names of the K classes, in label order.

    Raises:
        ConvpipeError: If any argument is invalid or the network does not fit the image size.
    """

    def __init__(
        self,
        model: Mapping[str, Any] | ModelParams,
        train: Mapping[str, Any] | TrainParams,
        in_channels: int,
        image_hw: Sequence[int],
        num_classes: int,
        train_size: int,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        model_params = _parse_section(ModelParams, model, "model")
        train_params = _parse_section(TrainParams, _without_runtime_keys(train), "train")
        hw = _check_inputs(in_channels, image_hw, num_classes)
        _check_train_size(train_size)
        _check_optimizer(train_params)
        names = _check_class_names(class_names, num_classes)
        self.save_hyperparameters(
            {
                "model": model_params.model_dump(mode="json"),
                "train": train_params.model_dump(mode="json"),
                "in_channels": int(in_channels),
                "image_hw": list(hw),
                "num_classes": int(num_classes),
                "train_size": int(train_size),
                "class_names": names,
            }
        )
        self.model_params = model_params
        self.train_params = train_params
        self.num_classes = int(num_classes)
        self.binary = num_classes == 2
        self.input_shape = (int(in_channels), *hw)
        self.net = build_cnn(model_params, in_channels, hw, num_classes)
        self.runtime: RuntimeParams | None = None  # how to run: see use_runtime()
        self._compiled_net: nn.Module | None = None  # set by setup("fit") with runtime.compile
        # The epoch's training sums so far: J * n, penalty * n, correct, n. Logged once, at
        # the epoch's last step; float64 on the CPU whatever the device (MPS has no float64).
        self._train_sums = torch.zeros(4, dtype=torch.float64)
        self.val_acc = _accuracy(num_classes)
        self.test_acc = _accuracy(num_classes)
        # Images seen per evaluation split, summed over DDP ranks: proves each counts once.
        self.val_count = SumMetric()
        self.test_count = SumMetric()
        self.example_input_array = torch.zeros(1, *self.input_shape)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch.

        Args:
            x: Float ``(N, C, H, W)``, already normalised, with the ``C, H, W`` of training.

        Returns:
            ``(N,)`` logits of class 1 for 2 classes, else ``(N, K)`` logits.

        Raises:
            ConvpipeError: If ``x`` does not have the shape the network was built for.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ConvpipeError(
                f"the model expects images of shape (N, {', '.join(map(str, self.input_shape))})"
                f" but got a batch of shape {tuple(x.shape)}",
                "at the model input",
                "prepare the data with the data.image_size and data.channels used in training",
            )
        if self.runtime is not None and self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_net
        logits = compiled(x) if compiled is not None and self.training else self.net(x)
        return logits[:, 0] if self.binary else logits

    def data_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean data loss J of a batch.

        Args:
            logits: Output of :meth:`forward`, ``(N,)`` or ``(N, K)``.
            y: int64 labels ``(N,)`` in ``[0, K)``.

        Returns:
            Scalar: binary cross-entropy with logits for 2 classes, else cross-entropy.
        """
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        return F.cross_entropy(logits, y)

    def penalty(self) -> Tensor:
        """The lambda/m weight penalty of the current weights (m = ``hparams.train_size``)."""
        train = self.train_params
        return regularization_penalty(
            self.net, train.reg_type, train.reg_lambda, int(self.hparams["train_size"])
        )

    def _shared_step(self, batch: Sequence[Tensor], split: str) -> Tensor:
        """Loss, accuracy and logging for one ``val`` or ``test`` batch.

        Args:
            batch: ``(x, y)`` with x float ``(N, C, H, W)`` and y int64 ``(N,)``.
            split: ``val`` or ``test``.

        Returns:
            The mean data loss J of the batch.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.data_loss(logits, y)
        accuracy: Metric = getattr(self, f"{split}_acc")
        accuracy.update(torch.sigmoid(logits) if self.binary else logits, y)
        size = int(x.shape[0])
        bar = split != "test"
        opts: dict[str, Any] = {"on_step": False, "on_epoch": True, "batch_size": size}
        self.log(f"{split}/loss", loss, prog_bar=bar, sync_dist=True, **opts)
        self.log(f"{split}/acc", accuracy, prog_bar=split == "val", **opts)
        counter: Metric = getattr(self, f"{split}_count")
        counter.update(torch.tensor(float(size), device=x.device))
        self.log(f"{split}/count", counter, **opts)
        return loss

    def _correct(self, logits: Tensor, y: Tensor) -> Tensor:
        """Number of right predictions in a batch (argmax, or logit > 0 for 2 classes)."""
        predicted = (logits > 0).long() if self.binary else logits.argmax(dim=1)
        return (predicted == y).sum()

    def _last_step_of_epoch(self, batch_idx: int) -> bool:
        trainer = self.trainer
        if batch_idx + 1 >= trainer.num_training_batches:
            return True
        return 0 < trainer.max_steps <= self.global_step + 1  # max_steps ends mid-epoch

    def _log_train_epoch(self) -> None:
        """Log the epoch's train metrics, reduced over DDP ranks (the sums, then the means)."""
        sums = self._train_sums.clone()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        loss, penalty, correct = (sums[:3] / sums[3].clamp(min=1)).float().to(self.device)
        # every rank now holds the same global means: sync_dist averages equal values (exact),
        # and spares the "use sync_dist=True" warning Lightning gives under DDP otherwise
        opts: dict[str, Any] = {"on_step": False, "on_epoch": True, "batch_size": 1}
        opts["sync_dist"] = True
        self.log("train/loss", loss, prog_bar=True, **opts)
        self.log("train/acc", correct, **opts)
        self.log("train/penalty", penalty, **opts)
        self.log("train/objective", loss + penalty, **opts)

    def _check_finite(self, objective: Tensor) -> None:
        value = float(objective.detach())
        if math.isfinite(value):
            self._last_finite_loss = value
            return
        last = getattr(self, "_last_finite_loss", None)
        before = f", last finite loss {last:.6g}" if last is not None else " at the first step"
        raise ConvpipeError(
            f"training diverged: loss became {value} at epoch {self.current_epoch}, "
            f"step {self.global_step}{before}",
            "while training",
            f"lower train.lr (now {self.train_params.lr:g}) or check the data for nan/inf values",
        )

    def on_train_epoch_start(self) -> None:
        """Start the epoch's training sums from zero.

        A new tensor, not ``zero_()``: under ``ddp_spawn`` the ranks inherit the module's
        tensors in shared memory, and one shared tensor would add up both ranks' batches.
        """
        self._train_sums = torch.zeros(4, dtype=torch.float64)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Minimise J + penalty on one training batch; stop with an error if it is nan/inf.

        The epoch's ``train/*`` metrics are summed here in one small tensor and logged once,
        at the last step of the epoch: a ``self.log`` per metric and step costs Lightning
        about as much as a small batch's forward pass.

        Args:
            batch: ``(x, y)`` with x float ``(N, C, H, W)`` and y int64 ``(N,)``.
            batch_idx: Index of the batch in the epoch.

        Returns:
            The objective J + penalty, which the optimiser minimises.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.data_loss(logits, y)
        penalty = self.penalty()
        objective = loss + penalty
        self._check_finite(objective)
        size = float(x.shape[0])
        dtype = loss.dtype  # the penalty follows the weights' dtype, which may differ
        right = self._correct(logits.detach(), y).to(dtype)
        step = torch.stack([loss.detach() * size, penalty.detach().to(dtype) * size, right])
        self._train_sums[:3] += step.to("cpu", torch.float64)
        self._train_sums[3] += size
        if self._last_step_of_epoch(batch_idx):
            self._log_train_epoch()
        return objective

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``val/loss`` and ``val/acc`` for one batch."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``test/loss`` and ``test/acc`` for one batch."""
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, K)`` for a batch ``x`` or ``(x, y)`` (labels ignored)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return probabilities(self(x), self.num_classes)

    def use_runtime(self, runtime: RuntimeParams) -> None:
        """Run with ``runtime``'s memory layout, threads and compilation from now on.

        How a module runs is not what it learnt, so none of it is a hyperparameter: a
        module without a runtime (loaded for evaluation, prediction, export) runs NCHW,
        eager, with the process's threads.

        Args:
            runtime: The ``runtime`` section.
        """
        self.runtime = runtime
        # NHWC is oneDNN's fast convolution layout on CPU; the weights keep their values and
        # state_dict keys, only the strides change.
        layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=layout)  # type: ignore[call-overload]

    def setup(self, stage: str) -> None:
        """Give this process its share of the CPU threads; compile the network for ``fit``.

        Both follow :meth:`use_runtime`. With ``runtime.compile``, training steps run
        ``torch.compile(net)``, which shares the eager network's parameters; validation,
        testing and prediction stay eager (no second compile for eval mode and other batch
        sizes).
        """
        runtime = self.runtime
        if runtime is None:
            return
        processes = self.trainer.num_devices if self._trainer is not None else 1
        torch.set_num_threads(cpu_threads(runtime.threads, processes))
        if stage == "fit" and runtime.compile and self._compiled_net is None:
            # torch.compile(module), not module.compile(): torch 2.13 silently skips the latter
            # for a Sequential of built-in layers (pytorch#150915). Kept out of the submodules,
            # so state_dict keys stay those of the eager network.
            object.__setattr__(self, "_compiled_net", torch.compile(self.net))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The optimiser and optional scheduler from the ``train`` section."""
        optimizer = build_optimizer(self.parameters(), self.train_params)
        total = None
        if self.train_params.scheduler == "onecycle":
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.train_params, total)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

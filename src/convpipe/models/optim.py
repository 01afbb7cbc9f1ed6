"""The optimiser and learning-rate scheduler that ``params.train`` names.

Optimisers get no ``weight_decay``: regularisation is the explicit lambda/m penalty of
:func:`convpipe.models.network.regularization_penalty`, and a decay would be a second one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfigType
from torch import nn

from convpipe.config.schema import TrainParams
from convpipe.errors import ConvpipeError
from convpipe.models.network import backbone_parameters

__all__ = [
    "PER_STEP_SCHEDULERS",
    "PLATEAU_FACTOR",
    "PLATEAU_PATIENCE_DIVISOR",
    "STEP_GAMMA",
    "STEP_PHASES",
    "base_lr",
    "budget_epochs",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer",
    "global_batch",
    "parameter_groups",
    "warmup_decay",
]

# Stepped after every optimiser step, over the whole training's steps.
PER_STEP_SCHEDULERS = ("onecycle", "warmup_linear", "warmup_cosine")

# The run in three equal phases at lr, lr/10 and lr/100: the classic ImageNet ResNet recipe
# (torchvision's: 90 epochs, the rate / 10 every 30), scaled to train.max_epochs.
STEP_PHASES = 3
# 10x per decay, as in that recipe, so the last third fine-tunes at lr / 100.
STEP_GAMMA = 0.1
# The same 10x drop as the step schedule (and torch's default), so `plateau` and `step` runs
# reach the same rates and differ only in when they drop.
PLATEAU_FACTOR = 0.1
# Half of early stopping's patience (train.patience): the rate drops after about half the
# epochs without improvement that early stopping waits, so a run stuck at too high a rate gets
# tried at a lower one before training gives up on it.
PLATEAU_PATIENCE_DIVISOR = 2


def check_optimizer(train: TrainParams) -> None:
    """Refuse an optimiser setting PyTorch would reject only once training starts.

    Raises:
        ConvpipeError: For ``nesterov`` with ``momentum`` 0.
    """
    if train.optimizer == "nesterov" and train.momentum <= 0:
        raise ConvpipeError(
            f"train.optimizer nesterov needs a momentum > 0, got train.momentum={train.momentum}",
            "in params train",
            "set train.momentum (e.g. 0.9) or use train.optimizer sgd",
        )


def global_batch(train: TrainParams, train_size: int) -> int:
    """Images per optimiser step over all processes: ``train.batch_size`` (``full``: all)."""
    if train.batch_size == "full":
        return train_size
    return min(int(train.batch_size), train_size)


def budget_epochs(train: TrainParams, train_size: int) -> int:
    """The epochs a training runs: ``train.max_epochs``, or fewer for ``train.max_steps``.

    A step budget is rounded up to whole epochs, so training still ends with a validation
    (what early stopping and the best checkpoint judge) and a full pass over the data:
    ``min(max_epochs, ceil(max_steps / steps_per_epoch))``.

    Args:
        train: The ``train`` section.
        train_size: Training images m (copies included).
    """
    if train.max_steps is None:
        return train.max_epochs
    per_epoch = math.ceil(train_size / global_batch(train, train_size))
    return max(1, min(train.max_epochs, math.ceil(train.max_steps / per_epoch)))


def base_lr(train: TrainParams, batch: int) -> float:
    """The learning rate of the weights: ``train.lr``, per batch or per image.

    Args:
        train: The ``train`` section (``lr``, ``lr_unit``).
        batch: The global batch size (images per optimiser step, over every DDP process).

    Returns:
        ``train.lr`` for ``lr_unit: batch``; ``train.lr * batch`` for ``lr_unit: sample``,
        where ``lr`` is the step size per image of the batch's summed loss (the loss is the
        batch mean, so the rate is scaled instead): the linear scaling rule, so a recipe keeps
        its dynamics when the batch size changes.
    """
    return train.lr * batch if train.lr_unit == "sample" else train.lr


def parameter_groups(net: nn.Module, train: TrainParams, batch: int) -> list[dict[str, Any]]:
    """The trainable parameters in groups by learning rate.

    Conv and linear weights (the penalised ones, of 2 or more dimensions) get
    :func:`base_lr`; biases and batch-norm scales and shifts (1 dimension) get that rate times
    ``train.norm_bias_lr_scale``: they carry no penalty and little curvature, and recipes
    such as airbench train them much faster. The backbone's (``net.features``: conv blocks and
    residual stages) get their rate times ``train.backbone_lr_scale`` as well: fine-tuning
    moves trained features less than a new head. An empty group is left out; with both
    scales 1 all parameters form one group (logged as plain ``lr-<Optimizer>``).
    """
    lr = base_lr(train, batch)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if train.norm_bias_lr_scale == 1.0 and train.backbone_lr_scale == 1.0:
        return [{"params": trainable, "lr": lr}]
    scale = train.backbone_lr_scale
    backbone = {id(p) for p in backbone_parameters(net)} if scale != 1.0 else set()
    parts = [("", [p for p in trainable if id(p) not in backbone], 1.0)]
    if backbone:
        parts.append(("backbone_", [p for p in trainable if id(p) in backbone], scale))
    groups: list[dict[str, Any]] = []
    for prefix, params, factor in parts:
        rate = lr * factor
        groups.append(
            {"params": [p for p in params if p.ndim > 1], "lr": rate, "name": f"{prefix}weights"}
        )
        groups.append(
            {
                "params": [p for p in params if p.ndim <= 1],
                "lr": rate * train.norm_bias_lr_scale,
                "name": f"{prefix}norm_bias",
            }
        )
    return [group for group in groups if group["params"]]


def build_optimizer(net: nn.Module, train: TrainParams, batch: int) -> torch.optim.Optimizer:
    """The optimiser named by ``train.optimizer`` over :func:`parameter_groups`, no weight decay.

    Regularisation is the explicit lambda/m penalty, so AdamW gets ``weight_decay=0`` (its
    default 0.01 would add a second, hidden regulariser) and then behaves like Adam.

    Args:
        net: The network whose trainable parameters are optimised.
        train: The ``train`` section (``optimizer``, ``lr``, ``lr_unit``,
            ``norm_bias_lr_scale``, ``momentum``).
        batch: The global batch size (for ``lr_unit: sample``).

    Returns:
        ``sgd``: SGD; ``momentum``: SGD with ``momentum``; ``nesterov``: SGD with momentum
        and ``nesterov=True``; ``adam``: Adam; ``adamw``: AdamW(weight_decay=0).

    Raises:
        ConvpipeError: For ``nesterov`` with ``momentum`` 0 (PyTorch rejects it).
    """
    check_optimizer(train)
    name = train.optimizer
    groups = parameter_groups(net, train, batch)
    lr = groups[0]["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name in ("momentum", "nesterov"):
        nesterov = name == "nesterov"
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def warmup_decay(step: int, warmup: int, total: int, shape: str) -> float:
    """The factor of the peak rate at optimiser step ``step`` for the ``warmup_*`` schedules.

    Rises linearly to 1 over the first ``warmup`` steps (``(step + 1) / warmup``, so the first
    step already moves), then decays to 0 at step ``total``, linearly (``linear``) or along a
    half cosine (``cosine``). Steps past ``total`` stay at 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    left = max(0.0, (total - step) / max(1, total - warmup))
    if shape == "linear":
        return left
    return 0.5 * (1.0 - math.cos(math.pi * left))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    train: TrainParams,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> LRSchedulerConfigType | None:
    """The learning-rate scheduler named by ``train.scheduler``.

    Stepped once per epoch: ``cosine``: CosineAnnealingLR over ``train.max_epochs``; ``step``:
    StepLR with ``step_size = max(1, max_epochs // STEP_PHASES)`` (3) and gamma
    ``STEP_GAMMA`` (0.1); ``plateau``: ReduceLROnPlateau on ``train.monitor`` in
    ``train.monitor_mode`` with factor ``PLATEAU_FACTOR`` (0.1) and
    ``patience = max(1, train.patience // PLATEAU_PATIENCE_DIVISOR)`` (2), so it can act
    before early stopping does.

    Stepped once per batch: ``onecycle``: OneCycleLR over ``total_steps``, warming up from
    ``lr / 25`` to each group's rate in the first 30 % of the steps, then annealing (cosine)
    to ``lr / 2.5e5`` after the last step. Momentum is not cycled, so ``train.momentum`` (and
    Adam's betas) stay as configured and plain ``sgd`` stays plain. ``warmup_linear`` and
    ``warmup_cosine``: :func:`warmup_decay`, rising over ``train.warmup_epochs`` worth of
    steps, then decaying to 0 at the last step.

    Args:
        optimizer: The optimiser to schedule (its groups' ``lr`` are the peak rates).
        train: The ``train`` section.
        total_steps: Optimiser steps of the whole training; the per-step schedules need it.
        steps_per_epoch: Optimiser steps of one epoch, for ``train.warmup_epochs``; by default
            ``total_steps / train.max_epochs`` (what it is unless ``train.max_steps`` ends
            the training earlier).

    Returns:
        A Lightning scheduler config dict, or None for ``none``.

    Raises:
        ValueError: For a per-step schedule without a positive ``total_steps``.
    """
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    if train.scheduler == "none":
        return None
    if train.scheduler in PER_STEP_SCHEDULERS:
        if not total_steps or total_steps < 1:
            raise ValueError(
                f"{train.scheduler} needs the number of training steps, got {total_steps!r}"
            )
        per_epoch = steps_per_epoch or total_steps / max(1, train.max_epochs)
        schedule = _per_step(optimizer, train, total_steps, per_epoch)
        return {"scheduler": schedule, "interval": "step"}
    if train.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_epochs)
    elif train.scheduler == "step":
        # at least 1: fewer epochs than phases give a step size of 0, and StepLR divides by it
        step_size = max(1, train.max_epochs // STEP_PHASES)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=step_size, gamma=STEP_GAMMA
        )
    else:
        # at least 1: with a patience of 0, one noisy epoch would cut the rate
        patience = max(1, train.patience // PLATEAU_PATIENCE_DIVISOR)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=train.monitor_mode, factor=PLATEAU_FACTOR, patience=patience
        )
        return {"scheduler": scheduler, "monitor": train.monitor, "interval": "epoch"}
    return {"scheduler": scheduler, "interval": "epoch", "frequency": 1}


def _per_step(
    optimizer: torch.optim.Optimizer, train: TrainParams, total_steps: int, per_epoch: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """``onecycle`` or a ``warmup_*`` schedule over ``total_steps`` optimiser steps."""
    if train.scheduler == "onecycle":
        # One step more than training takes: Lightning (like most loops) steps the scheduler
        # after the last optimiser step too, which would take OneCycleLR past its end and
        # back up to a high learning rate.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=int(total_steps) + 1,
            cycle_momentum=False,
        )
    warmup = max(1, min(round(train.warmup_epochs * per_epoch), int(total_steps) - 1))
    shape = train.scheduler.removeprefix("warmup_")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, warmup, int(total_steps), shape)
    )

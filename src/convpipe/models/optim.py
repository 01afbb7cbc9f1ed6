"""The optimiser and learning-rate scheduler that ``params.train`` names.

Optimisers get no ``weight_decay``: regularisation is the explicit lambda/m penalty of
:func:`convpipe.models.network.regularization_penalty`, and a decay would be a second one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfigType
from torch import nn

from convpipe.config.schema import TrainParams
from convpipe.errors import ConvpipeError

__all__ = [
    "PLATEAU_FACTOR",
    "PLATEAU_PATIENCE_DIVISOR",
    "STEP_GAMMA",
    "STEP_PHASES",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer",
]

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
    check_optimizer(train)
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
    StepLR with ``step_size = max(1, max_epochs // STEP_PHASES)`` (3) and gamma
    ``STEP_GAMMA`` (0.1); ``plateau``: ReduceLROnPlateau on ``train.monitor`` in
    ``train.monitor_mode`` with factor ``PLATEAU_FACTOR`` (0.1) and
    ``patience = max(1, train.patience // PLATEAU_PATIENCE_DIVISOR)`` (2), so it can act
    before early stopping does.

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

"""A yardstick for the CIFAR-10 recipes: airbench94's recipe as a plain PyTorch loop.

The accuracy goal of issue #15 (94 % in 0.36 PFLOP) is airbench94's figure (Keller Jordan,
arXiv 2404.00498) on CIFAR-10's lossless images and official test set. The data this project
has is different: the train split only, as JPEGs (quality ~75 with 4:2:0 chroma subsampling,
so the colour of a 32x32 photo is stored at 16x16), and a holdout carved from it. What the
best known recipe reaches on *these* images, in the same budget, is the fair yardstick for
convpipe's recipe; this module measures it.

The recipe, as the paper describes it (the code here is this project's own): a fixed 2x2
patch-whitening conv (its bias trained for the first 3 epochs), then three stages of
conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU (64, 256, 256 filters), batch norm
with scales frozen at 1, convolutions initialised with an identity (dirac) part, a 3x3 max
pool, a bias-free linear output scaled by 1/9; SGD with Nesterov momentum 0.85 on the
summed, label-smoothed (0.2) loss, batch 1024, biases at 64x the rate, a warm-up then
linear decay over 9.9 epochs; lookahead weight averaging every 5 steps; translate-by-2
(reflect padding) and alternating flips; evaluation with 6 views (flip x 3 translations).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from convpipe.models.whitening import whitening_filters

EPOCHS = 9.9
BATCH = 1024
MOMENTUM = 0.85
LR = 11.5  # per 1024 images of the summed loss, momentum-normalised (the paper's unit)
WEIGHT_DECAY = 0.0153  # per 1024 images, decoupled from the rate
BIAS_SCALE = 64.0
LABEL_SMOOTHING = 0.2
WHITEN_BIAS_EPOCHS = 3
WIDTHS = (64, 256, 256)


@dataclass
class Reference:
    """What the reference recipe reached on one split."""

    accuracy: float  # one view
    accuracy_tta: float  # 6 views
    flops: float  # training FLOPs, torch's counter
    seconds: float  # training wall time
    train_images: int


class _Stage(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU, with identity-initialised convs."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.bn1, self.bn2 = _norm(c_out), _norm(c_out)
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)  # scales frozen at 1: only the shifts are learnt
    return norm


class _Net(nn.Module):
    def __init__(self, whiten: Tensor) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten.shape[0], 2)
        self.whiten.weight.data.copy_(whiten)
        self.whiten.weight.requires_grad_(False)
        self.whiten.bias = nn.Parameter(torch.zeros(whiten.shape[0]))
        widths = (whiten.shape[0], *WIDTHS)
        self.stages = nn.Sequential(*(_Stage(a, b) for a, b in itertools.pairwise(widths)))
        self.out = nn.Linear(WIDTHS[-1], 10, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(F.gelu(self.whiten(x)))
        return self.out(F.max_pool2d(x, 3).flatten(1)) / 9


def _views(x: Tensor, epoch: int, flips: Tensor, generator: torch.Generator) -> Tensor:
    """Every image translated by up to 2 pixels (reflect), flipped on alternate epochs."""
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = torch.randint(0, 5, (2, len(x)), generator=generator)
    out = torch.empty_like(x)
    for dy in range(5):
        for dx in range(5):
            rows = (shifts[0] == dy) & (shifts[1] == dx)
            out[rows] = padded[rows, :, dy : dy + 32, dx : dx + 32]
    flip = flips ^ bool(epoch % 2)  # each image alternates, so every pair of epochs sees both
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def _predict(net: nn.Module, x: Tensor, dtype: torch.dtype, tta: bool) -> Tensor:
    def logits(views: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            return (net(views) + net(views.flip(3))).float() / 2

    out = []
    for chunk in x.split(1000):
        chunk = chunk.contiguous(memory_format=torch.channels_last)
        if not tta:
            with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
                out.append(net(chunk).float())
            continue
        padded = F.pad(chunk, (1, 1, 1, 1), mode="reflect")
        shifted = logits(padded[:, :, :32, :32]) + logits(padded[:, :, 2:, 2:])
        out.append(logits(chunk) / 2 + shifted / 4)
    return torch.cat(out)


def _flops(net: nn.Module, shape: tuple[int, ...]) -> float:
    """Training FLOPs of one image: forward + backward, counted by torch."""
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / 8


def train_reference(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    dtype: torch.dtype,
    seed: int = 0,
    epochs: float = EPOCHS,
) -> Reference:
    """Train the reference recipe on ``train`` and score it on ``test``.

    Args:
        train: uint8 images ``(N, 32, 32, 3)`` and int labels ``(N,)`` in 0..9.
        test: The same for the holdout.
        dtype: The autocast dtype (``torch.float32`` for none), as the recipe it is compared
            with trained.
        seed: Seeds the initial weights, the order and the augmentation.
        epochs: Passes over ``train`` (the paper's 9.9).

    Returns:
        The holdout accuracy with and without TTA, the training FLOPs and seconds.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(train[0]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(train[1])
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    x_test = (torch.from_numpy(test[0]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    net = _Net(whitening_filters(x[:5000], 2))  # convpipe's own: eigenvectors / sqrt(l + eps)
    per_image = _flops(net, tuple(x.shape[1:]))
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    steps = math.ceil(len(x) / BATCH)
    total = int(epochs * steps)
    optimizer = _optimizer(net)
    averaged = [t.detach().clone() for t in net.state_dict().values()]
    flips = torch.rand(len(x), generator=generator) < 0.5
    step, epoch, images, start = 0, 0, 0, time.perf_counter()
    while step < total:
        net.train()
        net.whiten.bias.requires_grad_(epoch < WHITEN_BIAS_EPOCHS)
        views = _views(x, epoch, flips, generator)
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(BATCH)[: total - step]:
            _step(net, optimizer, views[batch], y[batch], _schedule(step, total), dtype)
            step, images = step + 1, images + len(batch)
            if step % 5 == 0:  # lookahead: pull the weights toward their running average
                _lookahead(net, averaged, 0.95**5 * (step / total) ** 3)
        epoch += 1
    _lookahead(net, averaged, 0.0)
    seconds = time.perf_counter() - start
    net.eval()
    y_test = torch.from_numpy(test[1])
    plain, tta = (_predict(net, x_test, dtype, t).argmax(1) == y_test for t in (False, True))
    return Reference(
        float(plain.float().mean()),
        float(tta.float().mean()),
        per_image * images,
        seconds,
        len(x),
    )


def _optimizer(net: nn.Module) -> torch.optim.SGD:
    scale = BATCH * (1 + 1 / (1 - MOMENTUM))  # the paper's momentum-normalised unit
    lr, decay = LR / scale, WEIGHT_DECAY * BATCH / scale
    trainable = [p for p in net.parameters() if p.requires_grad]
    biases = [p for p in trainable if p.ndim < 2]
    weights = [p for p in trainable if p.ndim >= 2]
    groups = [
        {"params": biases, "lr": lr * BIAS_SCALE, "weight_decay": decay / (lr * BIAS_SCALE)},
        {"params": weights, "lr": lr, "weight_decay": decay / lr},
    ]
    for group in groups:
        group["peak"] = group["lr"]
    return torch.optim.SGD(groups, momentum=MOMENTUM, nesterov=True)


def _schedule(step: int, total: int) -> float:
    """From 0.2 up to 1 over the first 23 % of the steps, then linearly down to 0."""
    warmup = int(0.23 * total)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return (total - step) / (total - warmup)


def _step(
    net: nn.Module,
    optimizer: torch.optim.SGD,
    x: Tensor,
    y: Tensor,
    factor: float,
    dtype: torch.dtype,
) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak"] * factor
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        logits = net(x.contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits.float(), y, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _lookahead(net: nn.Module, averaged: list[Tensor], decay: float) -> None:
    for average, current in zip(averaged, net.state_dict().values(), strict=True):
        if current.dtype.is_floating_point:
            average.lerp_(current, 1 - decay)
            current.copy_(average)

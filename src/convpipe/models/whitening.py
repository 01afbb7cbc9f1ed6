"""A patch-whitening first layer: conv filters set from the training images, then frozen.

With ``model.whiten: true`` the first conv block's convolution is not learnt: before
training, its ``k x k`` filters (``k = model.conv[0].kernel``) are set to the eigenvectors
of the covariance of the training split's ``k x k`` patches, each divided by the square
root of its eigenvalue, followed by the same filters negated. The ``2 C k^2`` output
channels are then decorrelated, unit-variance versions of the input patches (and their
negatives, so a ReLU-like activation keeps both signs): the network starts from whitened
inputs, which lets the rest train at a high rate. This is airbench's fixed first layer
(Keller Jordan, arXiv 2404.00498). The weights live in the checkpoint like any others; only
the bias (when the block has no batch norm) is trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convpipe.config.schema import ModelParams
from convpipe.errors import ConvpipeError

__all__ = [
    "WHITEN_EPS",
    "WHITEN_IMAGES",
    "check_whitening",
    "first_conv",
    "freeze_whitening",
    "whitening_channels",
    "whitening_filters",
]

# Added to each eigenvalue before the square root: airbench's value, which keeps the
# near-zero-variance directions (flat patches) from being amplified into noise.
WHITEN_EPS = 5e-4
# Training images whose patches estimate the covariance: a 12x12 (or 27x27 for 3x3 RGB
# filters) covariance is settled by far fewer than the ~1M patches of 1,024 CIFAR images.
WHITEN_IMAGES = 1024


def whitening_channels(in_channels: int, kernel: int) -> int:
    """The output channels a whitening layer has: ``2 C k^2`` (each filter and its negation)."""
    return 2 * in_channels * kernel * kernel


def check_whitening(params: ModelParams, in_channels: int) -> None:
    """Refuse ``model.whiten`` with a first conv block of the wrong width.

    Raises:
        ConvpipeError: naming the filter count the first block needs.
    """
    if not params.whiten:
        return
    first = params.conv[0]
    needed = whitening_channels(in_channels, first.kernel)
    if first.filters != needed:
        raise ConvpipeError(
            f"model.whiten needs model.conv[0].filters = 2 * channels * kernel^2 = {needed} "
            f"for {in_channels}-channel images and kernel {first.kernel}, got {first.filters}",
            "in params.yaml",
            f"set model.conv[0].filters to {needed}, or model.whiten to false",
        )


def first_conv(net: nn.Module) -> nn.Conv2d:
    """The convolution of ``net``'s first conv block (``net.features[0].conv``)."""
    conv = net.get_submodule("features.0.conv")
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"features.0.conv must be a Conv2d, got {type(conv).__name__}")
    return conv


def freeze_whitening(net: nn.Module, params: ModelParams) -> None:
    """Make the first conv's weights constant (not trained, not penalised) under ``whiten``."""
    if params.whiten:
        first_conv(net).weight.requires_grad_(False)


@torch.no_grad()
def whitening_filters(images: Tensor, kernel: int, eps: float = WHITEN_EPS) -> Tensor:
    """Filters that whiten the ``kernel x kernel`` patches of ``images``.

    Args:
        images: Float ``(N, C, H, W)``, normalised as in training, ``H, W >= kernel``.
        kernel: The patch size ``k``.
        eps: Added to each eigenvalue (see :data:`WHITEN_EPS`).

    Returns:
        ``(2 d, C, k, k)`` conv weights, ``d = C k^2``: ``E^T / sqrt(lambda + eps)`` for the
        eigen-decomposition ``E diag(lambda) E^T`` of the patches' covariance, then the same
        filters negated. Applied to the patches (valid padding), the first ``d`` channels have
        covariance ``diag(lambda / (lambda + eps))``, the identity up to ``eps``.
    """
    c = images.shape[1]
    patches = images.unfold(2, kernel, 1).unfold(3, kernel, 1)  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel).double()
    cov = torch.cov(patches.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]
    filters = filters.reshape(-1, c, kernel, kernel).float()
    return torch.cat([filters, -filters])

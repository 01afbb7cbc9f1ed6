"""Grad-CAM: where in the image the network looked for the class it chose.

Selvaraju et al. (2017): the gradient of the chosen class's score with respect to the last
feature map, averaged over the map's pixels, weighs each channel; the ReLU of the weighted sum
of the channels is a coarse heat map of the evidence *for* that class, upsampled to the image.
The last feature map is the output of the last layer inside ``net.features`` (the conv blocks
or residual stages) that still has a spatial extent of at least 2x2, so the same code serves
plain and residual networks, and a network whose last pooling leaves 1x1 (the CIFAR recipe's)
is mapped at the layer before it rather than as one flat colour. (About 20 lines of tensor
code: captum's ``LayerGradCam`` does the same, but would be a dependency for them.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convpipe.models.module import CNNClassifier

__all__ = ["grad_cam"]


def grad_cam(model: CNNClassifier, images: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM maps of ``classes`` for ``images``.

    Args:
        model: The trained classifier (its weights are not changed; eval mode is used).
        images: Float ``(N, C, H, W)``, normalised as the model was trained.
        classes: ``(N,)`` the class whose evidence to map for each image (e.g. the predicted one).

    Returns:
        ``(N, H, W)`` maps in ``[0, 1]`` (each divided by its own maximum; all zero where the
        class has no positive evidence).
    """
    model.eval()
    captured: list[Tensor] = []
    leaves = [m for m in model.net.get_submodule("features").modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in leaves]
    try:
        with torch.enable_grad():
            logits = model(images.to(model.device))
            feature_map = _last_spatial(captured)
            chosen = classes.to(logits.device)
            if logits.ndim == 1:  # two classes: one logit, for class 1
                score = torch.where(chosen == 1, logits, -logits)
            else:
                score = logits.gather(1, chosen[:, None]).squeeze(1)
            (grads,) = torch.autograd.grad(score.sum(), feature_map)
    finally:
        for hook in hooks:
            hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): each channel's importance
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).cpu()


def _last_spatial(outputs: list[Tensor]) -> Tensor:
    """The last ``(N, C, H, W)`` output with ``H, W >= 2``, else the last one.

    A 1x1 map has one pixel to weigh, so its heat map would be one flat colour.
    """
    maps = [out for out in outputs if out.ndim == 4]
    spatial = [out for out in maps if min(out.shape[-2:]) >= 2]
    return (spatial or maps or outputs)[-1]

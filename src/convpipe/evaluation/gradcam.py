"""Grad-CAM: where in the image the network looked for the class it chose.

Selvaraju et al. (2017): the gradient of the chosen class's score with respect to the last
feature map, averaged over the map's pixels, weighs each channel; the ReLU of the weighted sum
of the channels is a coarse heat map of the evidence *for* that class, upsampled to the image.
The last feature map is the output of ``net.features`` — the last conv block or residual stage
— so the same code serves plain and residual networks. (About 20 lines of tensor code: captum's
``LayerGradCam`` does the same, but would be a dependency for them.)
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
    features = model.net.get_submodule("features")  # the last conv block or residual stage
    hook = features.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(images.to(model.device))
            feature_map = captured[-1]
            chosen = classes.to(logits.device)
            if logits.ndim == 1:  # two classes: one logit, for class 1
                score = torch.where(chosen == 1, logits, -logits)
            else:
                score = logits.gather(1, chosen[:, None]).squeeze(1)
            (grads,) = torch.autograd.grad(score.sum(), feature_map)
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): each channel's importance
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).cpu()

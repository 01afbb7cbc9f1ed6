"""Pictures of what the trained CNN computes: one image propagating through its layers.

``convpipe feature-maps IMAGE`` draws the course's visual summary of a CNN: the input, then for
every conv block the feature maps after its activation (one panel per filter), for every
pooling layer the pooled maps (one panel per channel, smaller: pooling shrinks each map while
each unit's receptive field grows), and the learned filters of the first conv layer.

The computation (:func:`feature_maps`, :func:`first_layer_filters`) takes tensors and returns
tensors; :func:`plot_feature_maps` turns them into a matplotlib ``Figure``; only the command
line reads files and writes the PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, cast

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from torch import Tensor, nn

from convpipe.data.transforms.normalize import normalize_batch
from convpipe.inference.predict import predict_images
from convpipe.models.module import CNNClassifier
from convpipe.tools.summary import receptive_fields

__all__ = [
    "MAX_COLUMNS",
    "LayerMaps",
    "feature_maps",
    "first_layer_filters",
    "picture",
    "plot_feature_maps",
]

#: Panels per row of one layer's grid; wider layers wrap onto more rows.
MAX_COLUMNS = 16
#: Maps drawn per layer: a ResNet stage has 512, which would make a picture metres tall; the
#: first 64 show what the layer does, and the heading says how many there are.
MAX_MAPS = 64
PANEL_INCHES = 0.75
TITLE_INCHES = 0.45


class LayerMaps(NamedTuple):
    """The output of one conv or pooling layer for one image.

    Attributes:
        name: The layer's name in params terms: ``model.conv[i]``, ``model.conv[i].pool`` or
            ``model.stages[i][j]`` (residual block j of stage i).
        label: What the layer is, e.g. ``conv 3x3/1 same 1->32 +bn relu``.
        maps: Float ``(C, H, W)``: one map per filter (conv) or channel (pooling).
        receptive_field: Side in input pixels of the window one unit of a map sees.
    """

    name: str
    label: str
    maps: Tensor
    receptive_field: int


@torch.no_grad()
def feature_maps(model: CNNClassifier, x: Tensor) -> list[LayerMaps]:
    """Run one image through the conv blocks and keep every conv and pooling output.

    A conv block's maps are taken after its activation (and batch norm), which is what the next
    layer sees; a pooling layer's maps are its output.

    Args:
        model: The trained classifier (switched to eval mode: batch norm uses running stats).
        x: Float ``(1, C, H, W)``, normalised like the training data.

    Returns:
        In forward order, for block i: ``model.conv[i]`` then ``model.conv[i].pool`` (when the
        block pools); then for residual stage i, block j: ``model.stages[i][j]``; each with
        ``maps`` of shape ``(C_i, H_i, W_i)``.

    Raises:
        ValueError: If ``x`` is not a single image of the model's input shape.
    """
    if x.ndim != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(
            f"x must be one image of shape (1, {', '.join(map(str, model.input_shape))}), "
            f"got {tuple(x.shape)}"
        )
    model.eval()
    rows = {
        row.name: row
        for row in receptive_fields(
            model.model_params,
            model.input_shape[0],
            model.input_shape[1:],
            model.num_classes,
        )
    }
    features = cast(nn.Sequential, model.net.features)
    out: list[LayerMaps] = []
    h = x
    for key, block in features.named_children():
        if key.startswith("stage"):  # model.stages[i]: the output of each residual block
            stage = key.removeprefix("stage")
            names = {j: f"model.stages[{stage}][{j}]" for j, _ in block.named_children()}
        else:  # model.conv[i]: after its activation and after its pooling
            names = {"act": f"model.conv[{key}]", "pool": f"model.conv[{key}].pool"}
        for child, module in block.named_children():
            h = module(h)
            name = names.get(child)
            if name is not None:
                row = rows[name]
                field = int(row.receptive_field or 0)
                out.append(LayerMaps(name, row.layer, h[0].detach().clone(), field))
    return out


def first_layer_filters(model: CNNClassifier) -> Tensor:
    """The learned kernels of ``model.conv[0]``.

    Returns:
        Float ``(F, C, k, k)``: F filters over the C input channels.
    """
    first = cast(nn.Sequential, model.net.features)[0]
    return cast(nn.Conv2d, first.conv).weight.detach().clone()


def _grid(count: int) -> tuple[int, int]:
    cols = min(count, MAX_COLUMNS)
    return math.ceil(count / cols), cols


def _panels(sub: SubFigure, count: int, prefix: str) -> list[Axes]:
    """``count`` image axes labelled ``prefix/i``, wrapped at MAX_COLUMNS; no spare axes."""
    rows, cols = _grid(count)
    grid = sub.subplots(rows, cols, squeeze=False)
    axes: list[Axes] = []
    for index, ax in enumerate(grid.flat):
        if index >= count:
            sub.delaxes(ax)
            continue
        ax.set_label(f"{prefix}/{index}")
        ax.set_xticks([])
        ax.set_yticks([])
        axes.append(ax)
    return axes


def _show_input(sub: SubFigure, image: np.ndarray, title: str) -> None:
    sub.suptitle(title, fontsize=10)
    (ax,) = _panels(sub, 1, "input")
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)


def _show_maps(sub: SubFigure, layer: LayerMaps) -> None:
    c, h, w = layer.maps.shape
    shown = min(c, MAX_MAPS)
    first = f" (the first {shown})" if shown < c else ""
    sub.suptitle(
        f"{layer.name}: {layer.label} -> {c} maps of {h}x{w}{first}, "
        f"receptive field {layer.receptive_field}x{layer.receptive_field}",
        fontsize=9,
    )
    maps = layer.maps.float().numpy()
    for index, ax in enumerate(_panels(sub, shown, layer.name)):
        ax.imshow(maps[index], cmap="viridis")  # own colour scale: each map's pattern shows


def _show_filters(sub: SubFigure, filters: Tensor) -> None:
    f, c, k, _ = filters.shape
    sub.suptitle(f"model.conv[0]: the {f} learned {k}x{k} filters", fontsize=9)
    weights = filters.float().numpy()
    for index, ax in enumerate(_panels(sub, f, "filters")):
        kernel = weights[index]
        if c == 3:
            low, high = kernel.min(), kernel.max()
            ax.imshow(np.transpose((kernel - low) / max(high - low, 1e-12), (1, 2, 0)))
        else:
            # Symmetric scale: blue weights subtract, red add, white ignore.
            bound = float(np.abs(kernel).max()) or 1.0
            ax.imshow(kernel.mean(axis=0), cmap="bwr", vmin=-bound, vmax=bound)


def plot_feature_maps(
    image: np.ndarray, layers: Sequence[LayerMaps], filters: Tensor, title: str
) -> Figure:
    """The visual summary: input, each layer's maps, first-layer filters.

    Args:
        image: The input as uint8 ``(H, W, C)``, C in {1, 3}, as the model saw it (resized).
        layers: From :func:`feature_maps`.
        filters: From :func:`first_layer_filters`, ``(F, C, k, k)``.
        title: Heading of the input row (e.g. the file and the predicted class).

    Returns:
        A figure with one axes per panel: ``input/0``, ``<layer name>/<channel>`` for every
        channel of every layer, ``filters/<f>`` per filter (each axes' label).
    """
    counts = [1, *(min(layer.maps.shape[0], MAX_MAPS) for layer in layers), filters.shape[0]]
    heights = [_grid(n)[0] * PANEL_INCHES + TITLE_INCHES for n in counts]
    width = max(_grid(n)[1] for n in counts) * PANEL_INCHES + 0.4
    fig = Figure(figsize=(max(width, 6.0), sum(heights)), layout="constrained")
    subs = fig.subfigures(len(counts), 1, height_ratios=heights, squeeze=False)[:, 0]
    _show_input(subs[0], image, title)
    for sub, layer in zip(subs[1:-1], layers, strict=True):
        _show_maps(sub, layer)
    _show_filters(subs[-1], filters)
    return fig


def picture(
    model: CNNClassifier,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    name: str,
    tta: str,
) -> Figure:
    """The feature-map figure of one image, headed by the model's prediction for it.

    Args:
        model: The trained classifier.
        image: uint8 ``(H, W, C)`` with the model's input geometry.
        mean: Per-channel mean of the training images (from the manifest).
        std: Per-channel standard deviation of the training images.
        name: What to call the image in the heading (e.g. its file name).
        tta: ``evaluate.tta``: the heading's prediction is the one predict and serving give.

    Returns:
        See :func:`plot_feature_maps`.
    """
    batch = torch.from_numpy(np.array(image[None], dtype=np.uint8))
    ((label, probability),) = predict_images(model, batch.numpy(), mean, std, 1, tta)[0]
    layers = feature_maps(model, normalize_batch(batch, mean, std))
    title = f"{name}: predicted {label} (p={probability:.3f})"
    return plot_feature_maps(image, layers, first_layer_filters(model), title)

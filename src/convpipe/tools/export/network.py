"""What gets exported: the checkpoint's network as a plain module, its input and output names."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from convpipe.models.module import CNNClassifier

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "LogitsNet", "Runner"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

#: A loaded export: normalised float32 ``(N, C, H, W)`` in, logits out
Runner = Callable[[Tensor], Tensor]


class LogitsNet(nn.Module):
    """The checkpoint's network as a plain module: what gets exported.

    :class:`~convpipe.models.module.CNNClassifier` carries Lightning state and raises
    :class:`ConvpipeError` from ``forward``; neither can be scripted or exported, so this
    module holds only the ``nn.Sequential`` and repeats the shape check with a plain error.

    Args:
        model: The trained classifier (its ``net`` is shared, not copied).
    """

    def __init__(self, model: CNNClassifier) -> None:
        super().__init__()
        self.net = model.net
        self.binary = bool(model.binary)
        # the temperature evaluate fitted (1.0: none), so the export gives the served logits
        self.temperature = float(model.temperature)
        channels, height, width = model.input_shape
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.message = f"expected a float32 batch of shape (N, {channels}, {height}, {width})"

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N,)`` (2 classes) or ``(N, K)`` for normalised float ``(N, C, H, W)``.

        Divided by the checkpoint's temperature, as :class:`CNNClassifier` divides them.
        """
        shape = images.shape
        if (
            images.dim() != 4
            or shape[1] != self.channels
            or shape[2] != self.height
            or shape[3] != self.width
        ):
            raise ValueError(self.message)
        logits = self.net(images)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits[:, 0] if self.binary else logits

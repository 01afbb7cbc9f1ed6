"""What a model costs to run here: parameters, FLOPs per image, latency at batch 1 and batch N.

The figures a tuning campaign can trade accuracy against. Parameters and FLOPs come from the
network's shapes by arithmetic (:func:`convpipe.models.shapes.layer_shapes`: 2 FLOPs per
multiply-add of the convolutions and matrix products, as ``torch.utils.flop_counter`` counts);
latency is measured on this machine:

- the model in eval mode on its device, random normalised input of the model's shape;
- :data:`WARMUP` untimed forward passes first (allocation, kernel choice, caches);
- then ``repeats`` timed passes, each ``time.perf_counter`` around one ``forward`` (the GPU
  synchronised before the clock stops), and the **median** reported, which one descheduled
  pass does not move;
- at batch 1 (one image, the interactive case) and at batch ``N`` (throughput), in
  milliseconds per batch, with the process's current thread count.
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from convpipe.models.module import CNNClassifier
from convpipe.models.shapes import layer_shapes

__all__ = ["COST_METRICS", "WARMUP", "Costs", "measure_costs", "median_latency_ms"]

#: untimed forward passes before the timed ones
WARMUP = 3
#: the cost figures a campaign may optimise or bound (all go down), :class:`Costs` fields
COST_METRICS = ("params", "flops", "latency_ms", "batch_latency_ms")


class Costs(NamedTuple):
    """A model's cost figures.

    Attributes:
        params: Trainable and fixed parameters of the network.
        flops: Forward FLOPs per image.
        latency_ms: Median milliseconds of one forward pass of 1 image.
        batch_latency_ms: Median milliseconds of one forward pass of ``batch`` images.
        batch: ``N`` of :attr:`batch_latency_ms`.
    """

    params: int
    flops: int
    latency_ms: float
    batch_latency_ms: float
    batch: int


@torch.no_grad()
def median_latency_ms(model: CNNClassifier, batch: int, repeats: int) -> float:
    """Median milliseconds of one eval-mode forward pass of ``batch`` images (see the module).

    Raises:
        ValueError: If ``batch`` or ``repeats`` is below 1.
    """
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be at least 1, got {batch} and {repeats}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch, *model.input_shape, device=device)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(WARMUP):
            model(x)
        synchronise()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            synchronise()
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def measure_costs(model: CNNClassifier, batch: int = 64, repeats: int = 20) -> Costs:
    """Parameters and FLOPs of ``model``'s network, and its latency here.

    Args:
        model: The classifier (weights as trained or not: the cost does not depend on them).
        batch: ``N`` of the batch latency.
        repeats: Timed passes per latency (the median is kept).

    Returns:
        The :class:`Costs`.
    """
    channels, height, width = model.input_shape
    rows = layer_shapes(model.model_params, channels, (height, width), model.num_classes)
    return Costs(
        params=sum(p.numel() for p in model.parameters()),
        flops=sum(row.flops for row in rows),
        latency_ms=median_latency_ms(model, 1, repeats),
        batch_latency_ms=median_latency_ms(model, batch, repeats),
        batch=batch,
    )

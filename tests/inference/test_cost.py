"""inference/cost.py: parameters and FLOPs by arithmetic, latency as a median of timed passes."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convpipe.inference.cost import WARMUP, measure_costs, median_latency_ms
from tests.helpers.models import TINY_RESIDUAL, classifier, model_variant


def test_flops_and_parameters_agree_with_torch_on_a_residual_network(params) -> None:
    model = classifier(params, num_classes=3, model=model_variant(params, **TINY_RESIDUAL))
    costs = measure_costs(model, batch=4, repeats=3)
    assert costs.params == sum(p.numel() for p in model.net.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, *model.input_shape))
    assert costs.flops == counter.get_total_flops()
    assert costs.latency_ms > 0 and costs.batch_latency_ms > 0 and costs.batch == 4


class _Sleeper(nn.Module):
    """Sleeps 4 ms a pass, except one timed pass that a descheduled process makes 80 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.input_shape = (1, 2, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.08 if self.calls == WARMUP + 2 else 0.004)
        return x


def test_latency_is_the_median_so_one_slow_pass_does_not_move_it() -> None:
    sleeper = _Sleeper()
    median = median_latency_ms(sleeper, batch=2, repeats=5)  # type: ignore[arg-type]
    assert sleeper.calls == WARMUP + 5
    assert 4.0 <= median < 20.0  # the 80 ms pass is one of five: not the median

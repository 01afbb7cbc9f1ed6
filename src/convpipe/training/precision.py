"""``train.precision: auto``: the precision this machine trains this model fastest in.

bfloat16 autocast trains a CNN to the same accuracy as fp32 (its fp32 master weights and
fp32 reductions keep the optimisation the same) but its speed depends on the hardware: on a
CPU with AMX or AVX-512 BF16 a bf16 product runs several times faster than fp32, on one
without them it is emulated and slower, and a tiny network is bound by overhead either way.
So ``auto`` measures instead of assuming:

- a CUDA GPU: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``;
- a CPU with native bf16 (``avx512_bf16`` or ``amx_bf16``) and one training process: a few
  training steps of the real model in each precision, interleaved, on a copy and with the
  random state put back; ``bf16-mixed`` if its best step is at least :data:`MIN_SPEEDUP`
  times faster than fp32's, else ``32-true``;
- anything else (no native bf16, several CPU processes that would each measure alone, MPS):
  ``32-true``.

The choice is logged and recorded on the MLflow run (``derived.precision``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from convpipe.config.schema import RuntimeParams, TrainParams
from convpipe.hardware import cpu_threads
from convpipe.models.module import CNNClassifier

__all__ = ["BF16_FLAGS", "MIN_SPEEDUP", "choose_precision", "resolve_precision"]

log = logging.getLogger("convpipe")

# CPU features that run bfloat16 natively; without them bf16 goes through fp32 conversions.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 must win clearly: a near tie would flip between runs on measurement noise, and then
# the same params would train in different precisions.
MIN_SPEEDUP = 1.25
# Timed training steps per precision, after one untimed step (allocation, kernel choice).
PROBE_STEPS = 3
# Images per probe step at most: enough to reach the kernels' steady speed.
PROBE_BATCH = 256


CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is missing, e.g. macOS)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def choose_precision(fp32_seconds: float, bf16_seconds: float) -> str:
    """``bf16-mixed`` if a bf16 step is at least :data:`MIN_SPEEDUP` times faster."""
    return "bf16-mixed" if fp32_seconds >= MIN_SPEEDUP * bf16_seconds else "32-true"


def _uses_cuda(train: TrainParams) -> bool:
    return train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Probe:
    """Training steps of a copy of ``model`` on one random batch, in either precision."""

    def __init__(self, model: CNNClassifier, batch: int) -> None:
        self.model = copy.deepcopy(model).train()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, *self.model.input_shape, generator=generator)
        self.y = torch.randint(0, self.model.num_classes, (batch,), generator=generator)

    def seconds(self, precision: str) -> float:
        """Wall seconds of one forward + backward in ``precision``."""
        autocast: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if precision == "bf16-mixed":
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        start = time.perf_counter()
        with autocast:
            loss = self.model.data_loss(self.model(self.x), self.y)
        loss.backward()
        return time.perf_counter() - start


def step_seconds(model: CNNClassifier, batch: int) -> dict[str, float]:
    """The fastest of :data:`PROBE_STEPS` training steps in fp32 and in bf16, interleaved.

    One untimed step of each first (allocation, kernel choice); then the two precisions take
    turns and each keeps its best time, so a burst of other work on the machine slows one
    step, not the verdict.
    """
    probe = _Probe(model, batch)
    precisions = ("32-true", "bf16-mixed")
    for precision in precisions:
        probe.seconds(precision)
    best = dict.fromkeys(precisions, float("inf"))
    for _ in range(PROBE_STEPS):
        for precision in precisions:
            best[precision] = min(best[precision], probe.seconds(precision))
    return best


def resolve_precision(
    train: TrainParams, runtime: RuntimeParams, model: CNNClassifier, batch: int
) -> str:
    """``train.precision``, with ``auto`` resolved for this machine and model.

    Args:
        train: The ``train`` section.
        runtime: The ``runtime`` section (the threads a training process uses).
        model: The model about to be trained (measured on a copy).
        batch: Images per training step and process.

    Returns:
        One of ``32-true``, ``16-mixed``, ``bf16-mixed``, ``64-true``.
    """
    if train.precision != "auto":
        return train.precision
    if _uses_cuda(train):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    processes = train.num_nodes * (train.devices if isinstance(train.devices, int) else 1)
    if train.accelerator == "mps" or processes > 1 or not cpu_flags() & BF16_FLAGS:
        return "32-true"
    size = max(1, min(batch, PROBE_BATCH))
    with torch.random.fork_rng(devices=[]), _threads(cpu_threads(runtime.threads, 1)):
        best = step_seconds(model, size)
    fp32, bf16 = best["32-true"], best["bf16-mixed"]
    chosen = choose_precision(fp32, bf16)
    log.info(
        "train.precision auto: %s (a bf16 training step takes %.2fx the time of an fp32 one)",
        chosen,
        bf16 / fp32,
    )
    return chosen

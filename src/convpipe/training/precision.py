"""``train.precision: auto``: the precision this machine trains this model fastest in.

bfloat16 autocast trains a CNN to the same accuracy as fp32 (its fp32 master weights and
fp32 reductions keep the optimisation the same) but its speed depends on the hardware: on a
CPU with AMX or AVX-512 BF16 a bf16 product runs several times faster than fp32, on one
without them it is emulated and slower, and a tiny network is bound by overhead either way.
So ``auto`` measures instead of assuming:

- a CUDA GPU: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``;
- a CPU with native bf16 (``avx512_bf16`` or ``amx_bf16``), one training process and a step of
  at least :data:`MIN_STEP_FLOPS` (a smaller one is bound by overhead: fp32): a few
  training steps of the real model in each precision, interleaved, on a copy and with the
  random state put back; ``bf16-mixed`` if its best step is at least :data:`MIN_SPEEDUP`
  times faster than fp32's, else ``32-true``;
- anything else (no native bf16, several CPU processes that would each measure alone, MPS):
  ``32-true``.

A measured verdict is kept in a per-user cache (:func:`cache_path`), keyed by the CPU, torch,
the threads, the probe batch and the network's layers, and reused: the same params on the same
machine then always train in the same precision. Measured afresh each run, a busy machine (two
tuning workers sharing two cores) could flip the verdict and change the result of a run with
the same seed. Delete the file to measure again.

The choice is logged and recorded on the MLflow run (``derived.precision``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from convpipe.config.schema import RuntimeParams, TrainParams
from convpipe.hardware import cpu_threads
from convpipe.io import exclusive_lock, write_json
from convpipe.models.module import CNNClassifier
from convpipe.models.shapes import layer_shapes

__all__ = ["BF16_FLAGS", "MIN_SPEEDUP", "cache_path", "choose_precision", "resolve_precision"]

log = logging.getLogger("convpipe")

# CPU features that run bfloat16 natively; without them bf16 goes through fp32 conversions.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 must win clearly: a near tie would flip between runs on measurement noise, and then
# the same params would train in different precisions.
MIN_SPEEDUP = 1.25
# A training step whose forward pass is below this many FLOPs is bound by per-operation
# overhead, which bf16's casts only add to: fp32 without measuring (the digits model, 0.04
# GFLOP a step, measured 1.08x; params/mnist.yaml's 1.4 GFLOP step 0.40x). A measurement of so
# small a step is also the one a busy machine flips most easily.
MIN_STEP_FLOPS = 2e8
# Timed training steps per precision, after one untimed step (allocation, kernel choice).
PROBE_STEPS = 3
# Images per probe step at most: enough to reach the kernels' steady speed.
PROBE_BATCH = 256


CPUINFO = Path("/proc/cpuinfo")
#: Overrides the folder of the measured-verdict cache (tests point it at a temp folder).
CACHE_ENV = "CONVPIPE_CACHE_DIR"


def _cpuinfo_field(name: str) -> str:
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(name):
            return line.partition(":")[2].strip()
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is missing, e.g. macOS)."""
    return frozenset(_cpuinfo_field("flags").split())


def cache_path() -> Path:
    """The file that keeps measured verdicts: ``$CONVPIPE_CACHE_DIR``, else the XDG cache."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = str(Path(base) / "convpipe")
    return Path(folder) / "precision.json"


def _layers(model: CNNClassifier) -> str:
    """The network's structure: each layer's kind and weight shapes.

    Not ``str(model)``, which also holds dropout rates and batch-norm momenta: values a
    campaign tunes that change nothing of the speed, and would re-measure (and so re-roll
    the verdict) on every trial.
    """
    return "\n".join(
        f"{name}:{type(module).__name__}:{[tuple(p.shape) for p in module.parameters(False)]}"
        for name, module in model.net.named_modules()
    )


def _cache_key(model: CNNClassifier, batch: int, threads: int) -> str:
    """What the verdict depends on: CPU, torch, threads, batch, memory layout and layers."""
    runtime = model.runtime
    parts = [
        _cpuinfo_field("model name") or platform.processor(),
        " ".join(sorted(cpu_flags() & BF16_FLAGS)),
        torch.__version__,
        str(threads),
        str(batch),
        str(tuple(model.input_shape)),
        f"channels_last={runtime.channels_last if runtime is not None else False}",
        _layers(model),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _read_verdicts(path: Path) -> dict[str, str]:
    try:
        verdicts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure (and rewrite it)
    return verdicts if isinstance(verdicts, dict) else {}


def _cached(key: str) -> str | None:
    chosen = _read_verdicts(cache_path()).get(key)
    return chosen if chosen in ("32-true", "bf16-mixed") else None


def _remember(key: str, chosen: str) -> str:
    """Keep ``chosen`` unless a verdict for ``key`` was kept meanwhile; return the kept one.

    Two processes that measured at once (two tuning workers) thus both train in the first
    one's verdict, not each in its own.
    """
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.with_suffix(".lock")):
            verdicts = _read_verdicts(path)
            if verdicts.get(key) in ("32-true", "bf16-mixed"):
                return verdicts[key]
            verdicts[key] = chosen
            write_json(path, verdicts)  # temp file + rename: a reader sees old or new
    except OSError as error:  # a read-only home: measure again next time, train now
        log.warning("train.precision auto: could not keep the verdict in %s (%s)", path, error)
    return chosen


def _geometry(model: CNNClassifier) -> tuple[int, tuple[int, int], int]:
    channels, height, width = model.input_shape
    return channels, (height, width), model.num_classes


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
    step_flops = size * sum(
        row.flops for row in layer_shapes(model.model_params, *_geometry(model))
    )
    if step_flops < MIN_STEP_FLOPS:
        log.info(
            "train.precision auto: 32-true (a %.2f GFLOP step is bound by overhead, not compute)",
            step_flops / 1e9,
        )
        return "32-true"
    threads = cpu_threads(runtime.threads, 1)
    key = _cache_key(model, size, threads)
    chosen = _cached(key)
    if chosen is not None:
        log.info(
            "train.precision auto: %s (measured before on this machine: %s)", chosen, cache_path()
        )
        return chosen
    with torch.random.fork_rng(devices=[]), _threads(threads):
        best = step_seconds(model, size)
    fp32, bf16 = best["32-true"], best["bf16-mixed"]
    chosen = _remember(key, choose_precision(fp32, bf16))
    log.info(
        "train.precision auto: %s (a bf16 training step takes %.2fx the time of an fp32 one)",
        chosen,
        bf16 / fp32,
    )
    return chosen

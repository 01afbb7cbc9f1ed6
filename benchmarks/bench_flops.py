"""Compute efficiency: achieved training FLOP/s as a fraction of this machine's matmul peak.

FLOPs: one forward + backward of the network on one batch, counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; batch norm,
pooling and the optimiser are free in that count, as in every MFU figure). Time: the real
training step, convpipe's Trainer + CNNClassifier + ConvDataModule, measured between batches
once warm (data loading, penalty, optimiser and Lightning included), validation off. Peak: a
large fp32 ``torch.mm`` at the same thread count. Each setting is measured in several rounds,
the settings interleaved, so machine load hits them alike.

Settings tried on params/mnist.yaml's model (28x28 MNIST-shaped data, online augmentation
off: that is the data pipeline, measured by bench_augment): NCHW vs channels-last memory
layout, torch.compile, 1 vs all threads, half to 4x the batch size, a DataLoader worker,
bf16-mixed precision (autocast; only if the CPU has bf16 instructions), and params.yaml's
smaller digits model for comparison. The one-off column is what the first steps of the first
round cost beyond steady-state steps (compiling, starting workers).

Goal: >= 40 % of the fp32 matmul peak with the settings params/mnist.yaml ships.

Usage: python benchmarks/bench_flops.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loop import mnist_like, quiet
from common import ROOT, Section, fmt, median_spread, print_sections

from convpipe.config.schema import Params, parse_params, read_yaml
from convpipe.models.module import cpu_threads
from convpipe.training.run import build_model, resolved_train
from convpipe.training.trainer import build_trainer

GOAL = 0.40
PEAK_SIZE = 4096
# Each knob compared, and its params section (what is learnt vs how it runs).
KNOBS = {
    "batch_size": "train",
    "precision": "train",
    "channels_last": "runtime",
    "compile": "runtime",
    "threads": "runtime",
    "num_workers": "runtime",
}
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # without them bf16 runs through fp32 conversions


@dataclass
class Setting:
    """One configuration: :data:`KNOBS` overrides and a label; its measurements, one per round."""

    label: str
    overrides: dict[str, Any]
    model: dict[str, Any] | None = None  # a whole ``model`` section, or None for the recipe's
    seconds: list[float] = field(default_factory=list)  # per steady-state training step
    startup: list[float] = field(default_factory=list)  # one-off seconds of the first steps
    flops: float = 0.0  # per training step


class StepTimer(L.Callback):
    """Wall time of the training steps after ``warmup`` (data loading included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.stamps: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stamp the start of the epoch, before the DataLoader starts (and its workers)."""
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Stamp the start of each step (the end of the previous one)."""
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stamp the end of the last step."""
        self.stamps.append(time.perf_counter())

    def per_step(self) -> float:
        """Mean seconds per step after warm-up."""
        timed = self.stamps[self.warmup :]
        return (timed[-1] - timed[0]) / (len(timed) - 1)

    def startup(self) -> float:
        """What the warm-up steps cost beyond steady-state steps: compiling, worker start."""
        return self.stamps[self.warmup] - self.start - self.warmup * self.per_step()


def matmul_peak(
    threads: int, repeats: int, size: int = PEAK_SIZE, dtype: torch.dtype = torch.float32
) -> list[float]:
    """FLOP/s of ``repeats`` ``size x size`` matrix products on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # MKL's first call allocates and picks its kernel
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * size**3 / (time.perf_counter() - start))
        return rates
    finally:
        torch.set_num_threads(before)


def step_flops(params: Params) -> float:
    """FLOPs of one forward + backward of the network on one ``train.batch_size`` batch."""
    L.seed_everything(params.base.seed, verbose=False)
    datamodule, model = build_model(params)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def time_steps(params: Params, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds per steady-state step with the train stage's Trainer, and the one-off cost."""
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)
    timer = StepTimer(warmup)
    with quiet(), tempfile.TemporaryDirectory(prefix="bench-flops-") as root:
        trainer = build_trainer(
            resolved_train(params, model, datamodule.train_size),
            [timer],
            False,
            root,
            interactive=False,
            limit_train_batches=warmup + steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            max_epochs=1,
        )
        trainer.fit(model, datamodule=datamodule)
    return timer.per_step(), timer.startup()


def with_overrides(params: Params, case: Setting) -> Params:
    """``params`` with the case's knob (and ``model``) overrides."""
    raw = params.model_dump(mode="json")
    for key, value in case.overrides.items():
        raw[KNOBS[key]][key] = value
    if case.model is not None:
        raw["model"] = case.model
    return parse_params(raw)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def settings(params: Params, quick: bool) -> list[Setting]:
    """The configurations to compare; the first is the shipped one."""
    base, runtime = params.train, params.runtime
    shipped = {key: getattr(getattr(params, section), key) for key, section in KNOBS.items()}
    bs = int(base.batch_size)
    flip_layout = not runtime.channels_last
    variants: list[tuple[str, dict[str, Any]]] = [
        ("params/mnist.yaml as shipped", {}),
        (f"channels_last {str(flip_layout).lower()}", {"channels_last": flip_layout}),
        (f"compile {str(not runtime.compile).lower()}", {"compile": not runtime.compile}),
        ("threads 1", {"threads": 1}),
        (f"batch_size {bs // 2}", {"batch_size": bs // 2}),
        (f"batch_size {bs * 2}", {"batch_size": bs * 2}),
        (f"batch_size {bs * 4}", {"batch_size": bs * 4}),
        ("num_workers 1", {"num_workers": 1}),
    ]
    if cpu_flags() & BF16_FLAGS:
        variants.append(("precision bf16-mixed", {"precision": "bf16-mixed"}))
    cases = [Setting(label, {**shipped, **extra}) for label, extra in variants]
    default = read_yaml(ROOT / "params.yaml")["model"]
    if default != params.model.model_dump(mode="json"):  # params.yaml may be the recipe itself
        filters = ", ".join(str(block["filters"]) for block in default["conv"])
        cases.append(Setting(f"params.yaml's model (conv {filters})", shipped, model=default))
    return cases[:2] if quick else cases


def run(quick: bool = False) -> list[Section]:
    """Measure achieved FLOP/s per setting against the matmul peak; one section."""
    rounds, warmup, steps = (1, 2, 3) if quick else (5, 8, 30)
    with tempfile.TemporaryDirectory(prefix="bench-flops-") as tmp:
        images = 2_000 if quick else 8_000
        params, data = mnist_like(Path(tmp), images, **{"augment.online": False})
        cases = settings(params, quick)
        for case in cases:
            case.flops = step_flops(with_overrides(params, case))
        for _ in range(rounds):  # interleaved: a change of machine load hits every setting
            for case in cases:
                per_step, startup = time_steps(with_overrides(params, case), warmup, steps)
                case.seconds.append(per_step)
                case.startup.append(startup)
    repeats = 3 if quick else 7
    threads = sorted({cpu_threads(c.overrides["threads"], 1) for c in cases})
    peaks = {n: matmul_peak(n, repeats) for n in threads}
    bf16 = matmul_peak(threads[-1], repeats, dtype=torch.bfloat16)
    timing = f"{warmup} warm-up steps, over {steps} steps, {rounds} rounds"
    return [_section(cases, peaks, bf16, params, f"{data}; {timing}")]


def _fraction(case: Setting, peaks: Mapping[int, list[float]]) -> list[float]:
    peak, _ = median_spread(peaks[cpu_threads(case.overrides["threads"], 1)])
    return [case.flops / s / peak for s in case.seconds]


def _row(case: Setting, peaks: Mapping[int, list[float]]) -> str:
    batch = int(case.overrides["batch_size"])
    return (
        f"| {case.label} | {case.flops / batch / 1e6:.1f} | "
        f"{fmt([batch / s for s in case.seconds], 0)} | "
        f"{fmt([case.flops / s / 1e9 for s in case.seconds], 1)} | "
        f"{fmt([100 * f for f in _fraction(case, peaks)], 1, ' %')} | "
        f"{case.startup[0]:.2f} s |"
    )


def _section(
    cases: list[Setting],
    peaks: Mapping[int, list[float]],
    bf16: list[float],
    params: Params,
    data: str,
) -> Section:
    fraction = _fraction(cases[0], peaks)
    value, _ = median_spread(fraction)
    rows = [
        "| setting | MFLOP/image | images/s | achieved GFLOP/s | fraction of peak "
        "| first steps' one-off cost (first round) |",
        "|---|---|---|---|---|---|",
        *(_row(case, peaks) for case in cases),
    ]
    peak_rows = [
        f"- fp32, {n} thread{'s' if n > 1 else ''}: {fmt([r / 1e9 for r in rates], 1)} GFLOP/s"
        for n, rates in peaks.items()
    ]
    flags = cpu_flags() & BF16_FLAGS
    peak_rows.append(
        f"- bf16, {max(peaks)} threads (for reference): {fmt([r / 1e9 for r in bf16], 1)} "
        f"GFLOP/s; CPU bf16 flags: {', '.join(sorted(flags)) or 'none'}"
    )
    train, model = params.train, params.model
    shipped = ", ".join(f"{key} {getattr(train, key)}" for key in KNOBS)
    body = f"""
Data: {data}; online augmentation off. Model: params/mnist.yaml (conv filters
{[b.filters for b in model.conv]}, hidden {model.hidden}). Shipped settings: {shipped}. Each
row below changes one of them (the last row swaps the model).

Matmul peak ({PEAK_SIZE}x{PEAK_SIZE} ``torch.mm``, the same thread count as the row):
{chr(10).join(peak_rows)}

{chr(10).join(rows)}

Fractions are of the fp32 peak at the row's thread count (1 thread: the 1-thread peak).
"""
    if value < GOAL:
        body += (
            f"\nMissed by {100 * (GOAL - value):.1f} percentage points: batch norm, ReLU, "
            "pooling and the optimiser are memory-bound and do no counted FLOPs.\n"
        )
    summary = (
        f"params/mnist.yaml trains at **{fmt([100 * f for f in fraction], 1, ' %')}** of the "
        "fp32 matmul peak."
    )
    goal = f">= {100 * GOAL:.0f} % of the fp32 matmul peak (params/mnist.yaml)"
    return Section("Compute efficiency", goal, value >= GOAL, summary, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds")
    print_sections(run(quick=parser.parse_args().quick))


if __name__ == "__main__":
    main()

"""Compute efficiency: achieved training FLOP/s as a fraction of this machine's dense peak.

FLOPs: one forward + backward of the network on one batch, counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; batch norm,
pooling and the optimiser are free in that count, as in every MFU figure). Time: the real
training step, convpipe's Trainer + CNNClassifier + ConvDataModule, measured between batches
once warm (data loading, penalty, optimiser and Lightning included), validation off. Peak:
the best large ``torch.mm`` at the same thread count and the precision trained (bf16 for
bf16-mixed, else fp32; ``common.dense_peak``), so no fraction can pass 100 %. Each setting
is measured in several rounds, the settings interleaved, so machine load hits them alike.

Settings tried on params/mnist.yaml's model (28x28 MNIST-shaped data, online augmentation
off: that is the data pipeline, measured by bench_augment): NCHW vs channels-last memory
layout, torch.compile, 1 vs all threads, half to 4x the batch size, a DataLoader worker,
bf16-mixed precision (autocast; only if the CPU has bf16 instructions), and params.yaml's
smaller digits model for comparison. The one-off column is what the first steps of the first
round cost beyond steady-state steps (compiling, starting workers).

Goal: >= 40 % of the dense peak with the settings params/mnist.yaml ships (``precision: auto``
resolved as the train stage does).

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
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loop import mnist_like, quiet
from common import ROOT, Section, dense_peak, fmt, median_spread, print_sections

from convpipe.config.schema import Params, parse_params, read_yaml
from convpipe.hardware import cpu_threads
from convpipe.training.precision import BF16_FLAGS, cpu_flags
from convpipe.training.run import build_model, resolved_train
from convpipe.training.trainer import build_trainer

GOAL = 0.40
# Each knob compared, and its params section (what is learnt vs how it runs).
KNOBS = {
    "batch_size": "train",
    "precision": "train",
    "channels_last": "runtime",
    "compile": "runtime",
    "threads": "runtime",
    "num_workers": "runtime",
}


@dataclass
class Setting:
    """One configuration: :data:`KNOBS` overrides and a label; its measurements, one per round."""

    label: str
    overrides: dict[str, Any]
    model: dict[str, Any] | None = None  # a whole ``model`` section, or None for the recipe's
    seconds: list[float] = field(default_factory=list)  # per steady-state training step
    startup: list[float] = field(default_factory=list)  # one-off seconds of the first steps
    flops: float = 0.0  # per training step
    precision: str = ""  # what the training ran in (auto resolved)


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


def step_flops(params: Params) -> float:
    """FLOPs of one forward + backward of the network on one ``train.batch_size`` batch."""
    L.seed_everything(params.base.seed, verbose=False)
    datamodule, model = build_model(params)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def time_steps(params: Params, warmup: int, steps: int) -> tuple[float, float, str]:
    """Seconds per steady-state step with the train stage's Trainer, the one-off cost, and
    the precision trained in (``auto`` resolved as the train stage does)."""
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)
    timer = StepTimer(warmup)
    train = resolved_train(params, model, datamodule.train_size)
    with quiet(), tempfile.TemporaryDirectory(prefix="bench-flops-") as root:
        trainer = build_trainer(
            train,
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
    return timer.per_step(), timer.startup(), train.precision


def with_overrides(params: Params, case: Setting) -> Params:
    """``params`` with the case's knob (and ``model``) overrides."""
    raw = params.model_dump(mode="json")
    for key, value in case.overrides.items():
        raw[KNOBS[key]][key] = value
    if case.model is not None:
        raw["model"] = case.model
    return parse_params(raw)


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
    """Measure achieved FLOP/s per setting against the dense peak; one section."""
    rounds, warmup, steps = (1, 2, 3) if quick else (5, 8, 30)
    with tempfile.TemporaryDirectory(prefix="bench-flops-") as tmp:
        images = 2_000 if quick else 8_000
        params, data = mnist_like(Path(tmp), images, **{"augment.online": False})
        cases = settings(params, quick)
        for case in cases:
            case.flops = step_flops(with_overrides(params, case))
        for _ in range(rounds):  # interleaved: a change of machine load hits every setting
            for case in cases:
                per_step, startup, precision = time_steps(
                    with_overrides(params, case), warmup, steps
                )
                case.seconds.append(per_step)
                case.startup.append(startup)
                case.precision = precision
    repeats = 2 if quick else 5
    peaks = {key: dense_peak(*key, repeats) for key in sorted({_peak_key(c) for c in cases})}
    timing = f"{warmup} warm-up steps, over {steps} steps, {rounds} rounds"
    return [_section(cases, peaks, params, f"{data}; {timing}")]


PeakKey = tuple[int, str]


def _peak_key(case: Setting) -> PeakKey:
    """(threads, the peak's precision): bf16-mixed rows against bf16, the rest against fp32."""
    precision = "bf16-mixed" if case.precision == "bf16-mixed" else "32-true"
    return cpu_threads(case.overrides["threads"], 1), precision


def _fraction(case: Setting, peaks: Mapping[PeakKey, float]) -> list[float]:
    peak = peaks[_peak_key(case)]
    return [case.flops / s / peak for s in case.seconds]


def _row(case: Setting, peaks: Mapping[PeakKey, float]) -> str:
    batch = int(case.overrides["batch_size"])
    return (
        f"| {case.label} ({case.precision}) | {case.flops / batch / 1e6:.1f} | "
        f"{fmt([batch / s for s in case.seconds], 0)} | "
        f"{fmt([case.flops / s / 1e9 for s in case.seconds], 1)} | "
        f"{fmt([100 * f for f in _fraction(case, peaks)], 1, ' %')} | "
        f"{case.startup[0]:.2f} s |"
    )


def _section(
    cases: list[Setting],
    peaks: Mapping[PeakKey, float],
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
        f"- {'bf16' if precision == 'bf16-mixed' else 'fp32'}, {n} thread{'s' if n > 1 else ''}: "
        f"{peak / 1e9:.1f} GFLOP/s"
        for (n, precision), peak in peaks.items()
    ]
    flags = cpu_flags() & BF16_FLAGS
    peak_rows.append(f"- CPU bf16 flags: {', '.join(sorted(flags)) or 'none'}")
    model = params.model
    shipped = ", ".join(
        f"{part}.{key} {getattr(getattr(params, part), key)}" for key, part in KNOBS.items()
    )
    body = f"""
Data: {data}; online augmentation off. Model: params/mnist.yaml (conv filters
{[b.filters for b in model.conv]}, hidden {model.hidden}). Shipped settings: {shipped}. Each
row below changes one of them (the last row swaps the model).

Dense peak (the best of 2048² and 4096² ``torch.mm`` products, at the row's thread count and
precision: bf16 for bf16-mixed rows, fp32 for the others):
{chr(10).join(peak_rows)}

{chr(10).join(rows)}

Fractions are of that peak, so none can exceed 100 % unless the peak was measured wrong.
"""
    if any(f > 1 for case in cases for f in _fraction(case, peaks)):
        body += "\nA fraction above 100 %: the peak was measured wrong (a kernel below its best).\n"
    if value < GOAL:
        body += (
            f"\nMissed by {100 * (GOAL - value):.1f} percentage points: batch norm, ReLU, "
            "pooling and the optimiser are memory-bound and do no counted FLOPs.\n"
        )
    summary = (
        f"params/mnist.yaml trains at **{fmt([100 * f for f in fraction], 1, ' %')}** of the "
        f"dense peak at the precision it trains in ({cases[0].precision})."
    )
    goal = f">= {100 * GOAL:.0f} % of the dense peak at the precision trained (params/mnist.yaml)"
    return Section("Compute efficiency", goal, value >= GOAL, summary, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds")
    print_sections(run(quick=parser.parse_args().quick))


if __name__ == "__main__":
    main()

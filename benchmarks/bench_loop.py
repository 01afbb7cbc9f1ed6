"""Loop overhead: convpipe's Trainer + CNNClassifier + ConvDataModule vs a plain PyTorch loop.

Both arms train the same network (built under the same seed, so the same initial weights), on
the same batches in the same order (the DataModule's seeded DistributedSampler, ``set_epoch``
per epoch), with the same batch size, thread count, λ/m penalty, optimiser, learning-rate
schedule and dropout stream (the global RNG is seeded identically and consumed identically).
The convpipe arm is the train stage's Trainer
(``convpipe.training.trainer.build_trainer``) with what differs only in logging turned off:
no logger, no progress bar, no checkpoints, no validation (the plain loop validates nothing
either). Runs alternate (convpipe, plain, before-the-fix,
convpipe, ...) so a change of machine load hits the arms alike; the figure is the ratio within
each round. The third arm is convpipe's training step as it was before issue #8 (a
``self.log`` per metric and step), kept to show what the fix is worth.

Data: a 12,000-image MNIST subset (28x28) when ``../shared/datasets/mnist`` exists, else the
digits upscaled to 28x28 with augmented copies up to a similar size; model and train settings
from ``params/mnist.yaml``.

Goal (Lightning's own parity bar): throughput ratio >= 0.95 and per-epoch losses equal to 5
decimals.

Usage: python benchmarks/bench_loop.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MNIST, ROOT, Section, fmt, median_spread, print_sections

from convpipe.config.edit import overlaid, set_dotted
from convpipe.config.schema import Params, parse_params
from convpipe.data.augment import write_augmented
from convpipe.data.prepare import write_prepared
from convpipe.data.sources import open_source
from convpipe.hardware import cpu_threads
from convpipe.models.module import CNNClassifier
from convpipe.models.network import regularization_penalty
from convpipe.models.optim import build_optimizer, build_scheduler, global_batch
from convpipe.training.callbacks import EpochHistory, ema_decay_at, weight_averaging
from convpipe.training.run import build_model, resolved_train
from convpipe.training.trainer import build_trainer

RECIPE = ROOT / "params" / "mnist.yaml"
GOAL_RATIO = 0.95
DECIMALS = 5
SUBSET = 12_000  # MNIST train images used (the rest of the 60,000 go to the unused val split)


@dataclass
class Run:
    """One arm's training: wall seconds, images per epoch, and the per-epoch mean data loss."""

    seconds: float
    images: int
    losses: list[float]

    @property
    def throughput(self) -> float:
        """Training images per second."""
        return self.images * len(self.losses) / self.seconds


def recipe(root: Path, overrides: Mapping[str, Any], path: Path = RECIPE) -> Params:
    """``params.yaml`` with the recipe at ``path`` and ``overrides``, every path under
    ``root``."""
    raw = overlaid(path, ROOT / "params.yaml")
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return parse_params(raw, str(path))


def prepare(params: Params) -> Params:
    """Run the prepare and augment stages' code for ``params`` (not timed by any benchmark)."""
    write_prepared(open_source(params.data), params.data, params.base.seed, params.paths.prepared)
    write_augmented(params)
    return params


def mnist_like(root: Path, train_images: int, **overrides: Any) -> tuple[Params, str]:
    """Prepared 28x28 digit data of about ``train_images`` training images, and its name.

    MNIST (a stratified subset) when ``../shared`` has it, otherwise sklearn's digits upscaled
    to 28x28 plus augmented copies, so the benchmark runs on any clone.
    """
    if MNIST.is_dir():
        fraction = 1 - train_images / 60_000
        data = {"data.path": str(MNIST), "data.val_fraction": round(fraction, 6)}
        name = f"MNIST subset ({train_images:,} train images, 28x28)"
        return prepare(recipe(root, {**data, "augment.copies": 0, **overrides})), name
    copies = max(0, round(train_images / 1257) - 1)  # digits: 1257 train images at 70 %
    data = {"data.source": "digits", "data.path": None, "data.image_size": 28}
    data.update({"data.val_fraction": 0.15, "data.test_fraction": 0.15})  # digits has no splits
    params = prepare(recipe(root, {**data, "augment.copies": copies, **overrides}))
    name = f"digits at 28x28 + {copies} augmented copies (no ../shared MNIST)"
    return params, name


@contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's per-fit banners and hints (they would swamp the results)."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


class PerStepLogging(CNNClassifier):
    """CNNClassifier's training step as it was before issue #8: for reference only.

    It logged four metrics with ``self.log`` and updated a torchmetrics accuracy on every
    step, which profiling showed to be most of convpipe's overhead over a plain loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def on_train_epoch_start(self) -> None:
        """Nothing to reset: Lightning reduces the per-step logs."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log loss, accuracy, penalty and objective on every step (epoch means)."""
        x, y = batch
        logits = self(x)
        loss = self.data_loss(logits, y, self.train_params.label_smoothing)
        self.train_acc.update(logits, y)
        opts: dict[str, Any] = {"on_step": False, "on_epoch": True, "batch_size": len(y)}
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, **opts)
        self.log("train/acc", self.train_acc, **opts)
        penalty = self.penalty()
        objective = loss + penalty
        self.log("train/penalty", penalty, sync_dist=True, **opts)
        self.log("train/objective", objective, sync_dist=True, **opts)
        self._check_finite(objective)
        return objective


def convpipe_run(params: Params, module: type[CNNClassifier] = CNNClassifier) -> Run:
    """Train ``train.max_epochs`` epochs with the train stage's Trainer, logging off."""
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)
    if module is not CNNClassifier:  # the same network, built under the same seed
        L.seed_everything(params.base.seed, workers=True, verbose=False)
        model = module(**model.hparams)
    history = EpochHistory()
    with quiet(), tempfile.TemporaryDirectory(prefix="bench-loop-") as root:
        start = time.perf_counter()
        trainer = build_trainer(
            params.train,
            [*weight_averaging(params.train), history],
            False,
            root,
            interactive=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
    return Run(seconds, datamodule.train_size, [row["train/loss"] for row in history.rows])


def before_fix_run(params: Params) -> Run:
    """:func:`convpipe_run` with the per-step logging convpipe had before issue #8."""
    return convpipe_run(params, PerStepLogging)


def _plain_step(
    model: CNNClassifier, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One optimisation step on ``J + λ/m Σw²``; returns the batch's mean data loss J."""
    train = model.train_params
    if model.runtime is not None and model.runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = train.precision == "bf16-mixed"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model.net(x), y, label_smoothing=train.label_smoothing)
    m = int(model.hparams["train_size"])
    objective = loss + regularization_penalty(model.net, train.reg_type, train.reg_lambda, m)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    optimizer.step()
    return loss.detach()


class PlainEMA:
    """The EMA of weights and buffers a hand-written loop keeps: one fused lerp per step."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        state = [*net.parameters(), *net.buffers()]
        self.current = [t for t in state if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.current]

    def update(self) -> None:
        """Move the average by ``1 - d`` towards the current weights (d warmed up)."""
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        torch._foreach_lerp_(self.average, [t.detach() for t in self.current], weight)
        self.updates += 1


def plain_run(params: Params) -> Run:
    """The same training as :func:`convpipe_run` in a hand-written loop over ``model.net``."""
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)  # the same network, built under the same seed
    train, runtime = params.train, params.runtime
    if train.precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"the plain loop runs 32-true or bf16-mixed, not {train.precision}")
    if train.scheduler == "plateau":
        raise ValueError("the plain loop replays per-batch and per-epoch schedules, not plateau")
    start = time.perf_counter()
    torch.set_num_threads(cpu_threads(runtime.threads, 1))
    torch.use_deterministic_algorithms(True)  # what Trainer(deterministic=True) sets
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    net = model.net
    if runtime.compile:
        net.compile()
    optimizer = build_optimizer(net, train, global_batch(train, datamodule.train_size))
    config = build_scheduler(optimizer, train, len(loader) * train.max_epochs)
    scheduler = config["scheduler"] if config else None
    per_step = config is not None and config["interval"] == "step"
    ema = PlainEMA(net, train.ema_decay) if train.ema_decay > 0 else None
    losses = []
    for epoch in range(train.max_epochs):
        loader.sampler.set_epoch(epoch)
        net.train()
        total = torch.zeros((), dtype=torch.float64)
        for x, y in loader:
            total += _plain_step(model, x, y, optimizer).double() * x.shape[0]
            if ema is not None:
                ema.update()
            if per_step and scheduler is not None:
                scheduler.step()
        if scheduler is not None and not per_step:
            scheduler.step()
        losses.append(float(total) / datamodule.train_size)
    return Run(time.perf_counter() - start, datamodule.train_size, losses)


def same_initial_weights(params: Params) -> bool:
    """Whether two builds under the seed give identical weights (what both arms rely on)."""
    states = []
    for _ in range(2):
        L.seed_everything(params.base.seed, workers=True, verbose=False)
        states.append(build_model(params)[1].state_dict())
    return all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def fixed_precision(params: Params) -> Params:
    """``params`` with ``train.precision: auto`` resolved once: every arm and round alike."""
    L.seed_everything(params.base.seed, workers=True, verbose=False)
    datamodule, model = build_model(params)
    return params.model_copy(update={"train": resolved_train(params, model, datamodule.train_size)})


CONVPIPE, PLAIN, BEFORE = (
    "convpipe (Trainer + CNNClassifier + ConvDataModule)",
    "plain PyTorch loop",
    "convpipe before the fix (per-step self.log)",
)
ARMS = {CONVPIPE: convpipe_run, PLAIN: plain_run, BEFORE: before_fix_run}


def measure(params: Params, repeats: int, arms: list[str]) -> dict[str, list[Run]]:
    """``repeats`` rounds of the ``arms`` in turn, after one untimed warm-up run of each."""
    for name in arms:  # oneDNN primitive caches, page cache, compile cache
        ARMS[name](params)
    runs: dict[str, list[Run]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name in arms:
            gc.collect()  # the previous run's garbage is collected now, not inside this run
            runs[name].append(ARMS[name](params))
    return runs


def _loss_table(runs: dict[str, list[Run]]) -> tuple[str, float]:
    """Markdown rows of the per-epoch losses, and the largest |difference| to the plain loop."""
    others = [name for name in runs if name != PLAIN]
    worst = max(
        abs(a - b)
        for name in others
        for ours, reference in zip(runs[name], runs[PLAIN], strict=True)
        for a, b in zip(ours.losses, reference.losses, strict=True)
    )
    header = " | ".join(f"{name} loss" for name in runs)
    rows = [f"| epoch | {header} | largest difference |", "|---" * (len(runs) + 2) + "|"]
    digits = DECIMALS + 2
    for epoch in range(len(runs[PLAIN][0].losses)):
        first = {name: arm_runs[0].losses[epoch] for name, arm_runs in runs.items()}
        gap = max(abs(first[name] - first[PLAIN]) for name in others)
        cells = " | ".join(f"{loss:.{digits}f}" for loss in first.values())
        rows.append(f"| {epoch} | {cells} | {gap:.1e} |")
    return "\n".join(rows), worst


def _arm_row(name: str, runs: list[Run], plain: list[Run]) -> str:
    throughput = fmt([r.throughput for r in runs], 0)
    ratio = fmt([p.seconds / r.seconds for r, p in zip(runs, plain, strict=True)])
    return f"| {name} | {throughput} | {fmt([r.seconds for r in runs], 2)} | {ratio} |"


@dataclass
class Overhead:
    """One loop-overhead measurement: the ratios, the loss agreement and the tables."""

    ratios: list[float]
    before: list[float]
    worst: float
    identical: bool
    arm_rows: str
    loss_table: str
    precision: str

    @property
    def ratio(self) -> float:
        """The median throughput ratio convpipe / plain loop."""
        return median_spread(self.ratios)[0]

    @property
    def equal(self) -> bool:
        """Whether every per-epoch loss equals the plain loop's to :data:`DECIMALS`."""
        return self.worst < 0.5 * 10**-DECIMALS

    def summary(self) -> str:
        """The one-paragraph result."""
        before = f" (before the fix: {fmt(self.before)})" if self.before else ""
        return (
            f"Throughput ratio convpipe / plain loop: **{fmt(self.ratios)}**{before}; per-epoch "
            f"losses {'equal' if self.equal else 'NOT equal'} to {DECIMALS} decimals (largest "
            f"difference {self.worst:.1e})."
        )


def overhead(params: Params, repeats: int, arms: list[str]) -> Overhead:
    """Measure the ``arms`` (the plain loop among them) on ``params``' prepared data."""
    params = fixed_precision(params)
    identical = same_initial_weights(params)
    runs = measure(params, repeats, arms)
    plain = runs[PLAIN]

    def ratios(name: str) -> list[float]:
        return [p.seconds / r.seconds for r, p in zip(runs[name], plain, strict=True)]

    table, worst = _loss_table(runs)
    arm_rows = "\n".join(_arm_row(name, arm_runs, plain) for name, arm_runs in runs.items())
    before = ratios(BEFORE) if BEFORE in runs else []
    precision = params.train.precision
    return Overhead(ratios(CONVPIPE), before, worst, identical, arm_rows, table, precision)


def run(quick: bool = False) -> list[Section]:
    """Measure the loop overhead; one section."""
    epochs, repeats, images = (1, 1, 1200) if quick else (3, 5, SUBSET)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        params, data = mnist_like(Path(tmp), images, **{"train.max_epochs": epochs})
        result = overhead(params, repeats, [CONVPIPE, PLAIN, BEFORE])
    met = result.ratio >= GOAL_RATIO and result.equal and result.identical
    train = params.train
    body = f"""
Setup: {data}; params/mnist.yaml's model, batch size {train.batch_size}, optimiser
{train.optimizer}, scheduler {train.scheduler}, online augmentation {params.augment.online},
{epochs} epochs per run, threads {cpu_threads(params.runtime.threads, 1)}, channels_last
{params.runtime.channels_last}, compile {params.runtime.compile}; {repeats} rounds of the
arms in turn after one warm-up run of each. Initial weights identical: {result.identical}.

| arm | images/s | seconds per run | ratio to the plain loop |
|---|---|---|---|
{result.arm_rows}

Per-epoch mean data loss J (first round; the summary gives the largest difference over all):

{result.loss_table}

Found by profiling (cProfile, per-step timings): ``CNNClassifier.training_step`` called
``self.log`` four times and updated a torchmetrics accuracy on every step; Lightning rebuilds
and deep-copies its logging metadata on each ``self.log`` call. Fixed in convpipe's
``models/module.py``: the step adds loss, penalty and correct counts into one small tensor and the
epoch means are logged once, at the epoch's last step (summed over DDP ranks first). The
remaining gap is Lightning's own per-step machinery (hooks, closure, profiler contexts).
"""
    if quick:
        body += "\nQuick run: too few steps to judge the ratio (start-up costs dominate).\n"
    elif result.ratio < GOAL_RATIO:
        short = GOAL_RATIO - result.ratio
        body += f"\nMissed by {short:.3f} (ratio {result.ratio:.3f} < {GOAL_RATIO}).\n"
    goal = f"throughput ratio >= {GOAL_RATIO} and per-epoch losses equal to {DECIMALS} decimals"
    return [Section("Loop overhead", goal, met, result.summary(), body)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds")
    print_sections(run(quick=parser.parse_args().quick))


if __name__ == "__main__":
    main()

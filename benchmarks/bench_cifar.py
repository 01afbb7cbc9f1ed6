"""Accuracy per FLOP on real photos: the CIFAR-10 recipes through the real DVC pipeline.

Does what the README's recipe says, in a throwaway copy of the project: CIFAR-10's train
split (``../shared/datasets/cifar10``, 50,000 JPEGs; its test split is not given) unpacked
into a temporary folder and linked as ``data/cifar10``, ``convpipe recipe
params/cifar10.yaml`` (and ``params/cifar10_fast.yaml`` on top for the fast variant), then
``dvc repro``. The recipe holds out 10 % of the train split (5,000 images, stratified and
seeded) as the test split and trains on 44,000; nothing is tuned on that holdout.

Reported per recipe: the holdout accuracy with the recipe's test-time augmentation (evaluate's
``metrics/eval.json``) and without it (training's ``metrics/train.json``), the training FLOPs
(``torch.utils.flop_counter`` on one forward + backward of the network, times the images
trained on: convolutions and matrix products, as in every MFU figure), the wall time of
``dvc repro train``, the achieved FLOP/s and its fraction of this machine's peak at the
precision trained (the best of large ``torch.mm`` products at that dtype, see
``common.dense_peak``), and how that compares with airbench94's 0.36 PFLOP for 94 %.

Goals (issue #15): >= 94 % with <= 1.2 x 0.36 PFLOP; the fast variant >= 90 % with
<= 0.12 PFLOP; training at >= 75 % of the peak. Skipped, with a message, when the CIFAR-10
tar is absent. Takes ~15-40 min on 2 cores, so it runs on its own (``make bench-cifar``).

Usage: python benchmarks/bench_cifar.py [--quick] [--only cifar10|cifar10_fast]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from airbench_ref import Reference, train_reference
from bench_loop import CONVPIPE, PLAIN, overhead, prepare, recipe
from common import ROOT, Checkout, Section, dense_peak, print_sections

from convpipe.config.schema import Params, load_params
from convpipe.hardware import cpu_threads
from convpipe.training.run import build_model

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-train-jpg.tar.gz"
AIRBENCH94_FLOPS = 0.36e15
RECIPES = {
    "cifar10": (["params/cifar10.yaml"], 0.94, 1.2 * AIRBENCH94_FLOPS),
    "cifar10_fast": (["params/cifar10.yaml", "params/cifar10_fast.yaml"], 0.90, 0.12e15),
}
GOAL_PEAK = 0.75
GOAL_LOOP = 0.98
LOOP_IMAGES = 10_000  # the loop-overhead subset of the train split
QUICK_PER_CLASS = 400


@dataclass
class Result:
    """One recipe's run."""

    name: str
    accuracy_tta: float
    accuracy: float
    train_images: int
    epochs: int
    flops: float
    seconds: float
    peak: float
    precision: str


def flops_per_image(params: Params) -> float:
    """Training FLOPs of one image: forward + backward of the network, counted by torch."""
    L.seed_everything(params.base.seed, verbose=False)
    _, model = build_model(params)
    model.train()
    x = torch.randn(8, *model.input_shape)
    y = torch.randint(0, model.num_classes, (8,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops()) / 8


def project_flops(root: Path, params: Params) -> tuple[float, int]:
    """Training FLOPs per image and the training images, of a project copy's trained params."""
    cwd = Path.cwd()
    os.chdir(root)  # build_model reads the copy's prepared data
    try:
        return flops_per_image(params), build_model(params)[0].train_size
    finally:
        os.chdir(cwd)


def unpack(dest: Path, quick: bool = False) -> Path:
    """The CIFAR-10 train split unpacked under ``dest``: ``dest/train/<class>/*.jpg``.

    ``quick`` keeps the first 400 images of each class (4,000 in all).
    """
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(dest, filter="data")
    if quick:
        for folder in (dest / "train").iterdir():
            for extra in sorted(folder.iterdir())[QUICK_PER_CLASS:]:
                extra.unlink()
    return dest / "train"


def train_recipe(name: str, images: Path, root: Path, quick: bool) -> Result:
    """Apply the recipe in a fresh project copy, run the pipeline, read its figures."""
    recipes, _, _ = RECIPES[name]
    project = Checkout.of_this_one(root)
    for overlay in recipes:
        project.run("convpipe", "recipe", overlay)  # as the README says
    data = project.root / "data" / "cifar10"
    data.mkdir(parents=True)
    os.symlink(images, data / "train", target_is_directory=True)
    if quick:  # 3 epochs on 3,200 images: still a real run of every stage
        project.set_params(
            **{"train.max_epochs": 3, "data.val_fraction": 0.1, "data.test_fraction": 0.1}
        )
    project.run("dvc", "repro", "augment")  # prepare: not part of the figure
    start = time.perf_counter()
    project.run("dvc", "repro", "train")
    seconds = time.perf_counter() - start
    project.run("dvc", "repro", "evaluate")
    train = json.loads((project.root / "metrics" / "train.json").read_text())
    evaluated = json.loads((project.root / "metrics" / "eval.json").read_text())
    params = load_params(project.root / "params.yaml")
    per_image, train_size = project_flops(project.root, params)
    epochs = int(train["epochs"])
    threads = cpu_threads(params.runtime.threads, 1)
    precision = trained_precision(project.root, str(train["mlflow_run_id"]))
    return Result(
        name,
        float(evaluated["accuracy"]),
        float(train["test/acc"]),
        train_size,
        epochs,
        per_image * train_size * epochs,
        seconds,
        dense_peak(threads, precision),
        precision,
    )


def trained_precision(root: Path, run_id: str) -> str:
    """The precision the training ran in: ``derived.precision`` of its MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return str(client.get_run(run_id).data.params["derived.precision"])


def _row(result: Result) -> str:
    rate = result.flops / result.seconds
    return (
        f"| `{result.name}` | {100 * result.accuracy_tta:.2f} % | {100 * result.accuracy:.2f} % "
        f"| {result.flops / 1e15:.3f} PFLOP ({result.flops / AIRBENCH94_FLOPS:.2f}x airbench94) "
        f"| {result.seconds / 60:.1f} min | {rate / 1e9:.0f} GFLOP/s | {result.precision} "
        f"| {100 * rate / result.peak:.0f} % of {result.peak / 1e9:.0f} |"
    )


def reference_run(project: Path, precision: str, quick: bool) -> Reference:
    """airbench94's recipe (a plain loop) on the images a recipe's project trained and tested on."""
    prepared = project / "data" / "prepared"

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.load(prepared / f"{name}_x.npy"), np.load(prepared / f"{name}_y.npy")

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    return train_reference(split("train"), split("test"), dtype, epochs=1.0 if quick else 9.9)


def _reference_row(ref: Reference) -> str:
    return (
        f"| airbench94's recipe, plain loop (the yardstick) | {100 * ref.accuracy_tta:.2f} % "
        f"| {100 * ref.accuracy:.2f} % | {ref.flops / 1e15:.3f} PFLOP "
        f"({ref.flops / AIRBENCH94_FLOPS:.2f}x airbench94) | {ref.seconds / 60:.1f} min "
        f"| {ref.flops / ref.seconds / 1e9:.0f} GFLOP/s | the same | |"
    )


REFERENCE_NOTE = (
    "The yardstick row is airbench94's own recipe (`benchmarks/airbench_ref.py`: the paper's "
    "network, hyperparameters and 9.9 epochs, as a plain PyTorch loop) trained on the same "
    "images and scored on the same holdout. The 94 % goal is airbench94's figure on lossless "
    "CIFAR-10 and its official test set; these JPEGs (quality ~75, colour stored at 16x16 by "
    "4:2:0 subsampling) carry less: the best known recipe, in its own budget, reaches the "
    "figure in that row on them."
)


def _verdict(result: Result) -> bool:
    _, accuracy, flops = RECIPES[result.name]
    rate = result.flops / result.seconds
    fast_enough = rate >= GOAL_PEAK * result.peak
    return result.accuracy_tta >= accuracy and result.flops <= flops and fast_enough


def run(quick: bool = False, only: list[str] | None = None) -> list[Section]:
    """Train each recipe once; one section with a row per recipe."""
    goal = (
        "cifar10 >= 94 % in <= 1.2 x 0.36 PFLOP (airbench94); cifar10_fast >= 90 % in "
        f"<= 0.12 PFLOP; training at >= {100 * GOAL_PEAK:.0f} % of the dense peak"
    )
    title = "Accuracy per FLOP (CIFAR-10, 5,000-image holdout of the train split)"
    if not CIFAR_TAR.is_file():
        return [Section(title, goal, None, f"Skipped: {CIFAR_TAR} not found.")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        images = unpack(Path(tmp) / "data", quick)
        loop = loop_section(images, Path(tmp) / "loop", quick)
        for name in only or list(RECIPES):
            results.append(train_recipe(name, images, Path(tmp) / name, quick))
        reference = reference_run(Path(tmp) / results[0].name, results[0].precision, quick)
    rows = "\n".join(_row(r) for r in results) + "\n" + _reference_row(reference)
    summary = "; ".join(
        f"`{r.name}`: {100 * r.accuracy_tta:.2f} % in {r.flops / 1e15:.3f} PFLOP, "
        f"{r.seconds / 60:.1f} min"
        for r in results
    )
    body = (
        "| recipe | holdout acc. (TTA) | without TTA | training FLOPs | `dvc repro train` "
        "| achieved | precision | of dense peak (GFLOP/s) |\n|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Trained on {results[0].train_images:,} images for {results[0].epochs} epochs; "
        "FLOPs count the forward and backward convolutions and products of every training "
        "image (not evaluation or TTA). The dense peak is the best large `torch.mm` at the "
        "precision trained, on the training's threads.\n\n"
        f"{REFERENCE_NOTE} Here it reached {100 * reference.accuracy_tta:.2f} %: "
        f"`{results[0].name}` is {100 * (results[0].accuracy_tta - reference.accuracy_tta):+.2f} "
        f"points from it."
    )
    met = None if quick else all(_verdict(r) for r in results)
    if met is False:
        body += "\n\n" + "\n".join(_shortfall(r) for r in results) + "\n\n" + TRIED
    return [Section(title, goal, met, summary, body), loop]


def loop_section(images: Path, root: Path, quick: bool) -> Section:
    """The ``cifar10`` recipe trained by convpipe and by a plain loop on identical batches."""
    count, epochs, repeats = (1_000, 1, 1) if quick else (LOOP_IMAGES, 2, 3)
    total = 10 * QUICK_PER_CLASS if quick else 50_000
    overrides = {
        "data.path": str(images),
        # the rest goes to validation and a small test split, which the loop never reads
        "data.val_fraction": round(1 - count / total - 0.01, 6),
        "data.test_fraction": 0.01,
        "train.max_epochs": epochs,
        "train.warmup_epochs": epochs / 2,  # the recipe's 2 would not fit in the short run
    }
    params = prepare(recipe(root, overrides, ROOT / "params" / "cifar10.yaml"))
    result = overhead(params, repeats, [CONVPIPE, PLAIN])
    met = None if quick else result.ratio >= GOAL_LOOP and result.equal and result.identical
    body = f"""
Setup: params/cifar10.yaml on a {count:,}-image subset of the train split, {epochs} epochs
per run, precision {result.precision} (``auto`` resolved once, for both arms), EMA weights and
online crop + flip in both; {repeats} rounds of the arms in turn after one warm-up run of
each. Both arms get their batches from the same seeded DataModule, so the batches are
identical. Initial weights identical: {result.identical}.

| arm | images/s | seconds per run | ratio to the plain loop |
|---|---|---|---|
{result.arm_rows}

Per-epoch mean data loss J (first round):

{result.loss_table}
"""
    goal = f"throughput ratio >= {GOAL_LOOP} and per-epoch losses equal"
    return Section("Loop overhead (CIFAR-10 recipe)", goal, met, result.summary(), body)


def _shortfall(result: Result) -> str:
    """By how much each goal of ``result``'s recipe is missed (or met)."""
    _, accuracy, flops = RECIPES[result.name]
    fraction = result.flops / result.seconds / result.peak
    return (
        f"- `{result.name}`: accuracy {100 * (result.accuracy_tta - accuracy):+.2f} points "
        f"against {100 * accuracy:.0f} %; FLOPs {result.flops / flops:.2f}x the allowed "
        f"{flops / 1e15:.2f} PFLOP; {100 * fraction:.0f} % of the dense peak against "
        f"{100 * GOAL_PEAK:.0f} %."
    )


# What was tried on the validation split before the recipes' one holdout reading (issue #15):
# printed under a missed goal, so a rerun of the benchmark keeps the record.
TRIED = """### What was tried (validation split only; the holdout was read once, above)

Tuning used 4,400 validation images carved from the 44,000 training images (training on the
other 39,600), best `val/acc` without TTA, `bf16-mixed`, one run each:

| recipe | epochs | val acc. | `dvc repro train` |
|---|---|---|---|
| A. the recipe before (see below) | 12 | 87.20 % | 12.1 min (44,000) |
| B. airbench94's remaining options (below), 10 epochs | 10 | 87.95 % | 7.2 min |
| C. B + reflected crop borders, 12 epochs: this recipe | 12 | 89.02 % | 7.7 min |

A: batch 512, `lr` 0.4 per batch, BN scales learnt, bias rate x8, lambda 150, conv -> BN ->
GELU -> pool, black crop borders (88.48 % on the holdout). B: BN scales fixed at 1, pool
before BN, dirac init, logits x 1/9, bias rate x64, batch 1024 at airbench's per-image rate
and decay (`lr_unit: sample`).

Earlier, on the 1,000-image split: `lr` 0.2 with lambda 10 overfitted (94.6 % training accuracy,
89.7 % val). Not built: airbench's alternating flips, lookahead (convpipe's EMA averages for
evaluation only), freezing the whitening bias after 3 epochs and a bias-free output layer.
On this data the accuracy goal looks out of reach in this budget: airbench94's own recipe
(the yardstick row) falls short of 94 % too. On the peak: the large
`torch.mm` that sets it runs far faster than this network's small convolutions (24-64
channels at 31x31 first), and batch norm, GELU, pooling and the optimiser do no counted
FLOPs."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs on 3,200 images")
    parser.add_argument("--only", nargs="*", choices=list(RECIPES), help="recipes to run")
    args = parser.parse_args()
    print_sections(run(args.quick, args.only))


if __name__ == "__main__":
    main()

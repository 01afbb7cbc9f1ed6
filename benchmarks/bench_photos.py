"""Photos with few images a class: params/photos.yaml against today's recipes, and fine-tuning.

Everything runs the README's commands in throwaway copies of the project (``convpipe recipe``,
``dvc repro``) on images carved from CIFAR-10's train split (``../shared/datasets/cifar10``,
JPEGs), as explicit ``train/``, ``val/`` and ``test/`` class folders with disjoint, seeded
picks, so every arm is scored on the same test images:

* ``small``: 200 training and 50 validation photos a class (10 classes), 100 test photos a
  class; the photos are 32 px, upscaled to the recipe's size. Arms: ``params.yaml`` as shipped
  at 64 px; ``params/cifar10.yaml`` adapted as the README says (native 32 px, batch 128,
  40 epochs: about the photos recipe's wall time); and ``params/photos.yaml`` (64 px). Test
  accuracy (evaluate, with each recipe's TTA) and the wall time of ``dvc repro train
  evaluate``, per seed (``base.seed``), mean and a 95 % t interval.
* ``finetune``: ``params/photos.yaml`` trained on 8 classes (500 + 50 photos each), registered
  as ``convpipe-photos@champion``; then the 2 other classes with 100 training photos each,
  fine-tuned from ``models:/convpipe-photos@champion`` (2 frozen epochs, backbone at 0.3x the
  rate) against the same recipe from scratch, per seed, on 200 test photos a class.
* ``cost``: ResNet-18 at 64 px trained by convpipe and by a plain PyTorch loop (images/s).
* ``whole``: a 5,000-photo folder through all of ``dvc repro`` with ``params/photos.yaml``
  (wall time, against the 15-minute budget).

Each run's figures are appended to a JSON-lines log as soon as they exist, so an interrupted
benchmark keeps them; the report is made from the log. Skipped, with a message, when the
CIFAR-10 tar is absent.

Usage: python benchmarks/bench_photos.py [--quick] [--part small|finetune|cost|whole] [--seeds N]
       [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    ROOT,
    Checkout,
    Section,
    append_record,
    print_sections,
    read_records,
    t_interval,
    write_results,
)

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-train-jpg.tar.gz"
SMALL = {"train": 200, "val": 50, "test": 100}
#: the source model's photos a class: CIFAR's 8 other classes, enough that the source's
#: features are worth starting from (a source at 500 a class reached only 64 %)
PRETRAIN = {"train": 2500, "val": 50, "test": 50}
NEW = {"train": 100, "val": 25, "test": 200}
QUICK_PRETRAIN = {"train": 20, "val": 5, "test": 5}
#: the source of the first fine-tuning runs, which logged no "source"
OLD_PRETRAIN = {"train": 500, "val": 50, "test": 50}
#: (recipes applied in order, params set after them) per arm of the small-data comparison.
ARMS: dict[str, tuple[list[str], dict[str, object]]] = {
    "params.yaml (64 px)": ([], {"data.source": "imagefolder", "data.image_size": 64}),
    "cifar10.yaml, adapted (32 px, batch 128, 40 epochs)": (
        ["params/cifar10.yaml"],
        {"train.batch_size": 128, "train.max_epochs": 40, "train.patience": 40},
    ),
    "photos.yaml (64 px)": (["params/photos.yaml"], {}),
}
#: --quick: a smoke run of every stage in seconds per run
QUICK = {
    "train.max_epochs": 2,
    "train.max_steps": 4,
    "train.warmup_epochs": 0.5,
    "train.batch_size": 8,
}
GOAL_MARGIN = 0.05  # "a clear margin": 5 points over the best other recipe, interval cleared
PARTS = ("small", "finetune", "cost", "whole")
#: the "whole" part: a ~5,000-photo folder through every stage, against this budget (seconds)
WHOLE = {"train": 400, "val": 50, "test": 50}
WHOLE_BUDGET = 15 * 60


# What was tried before this file's photos.yaml, on the validation split of seed 0's carve
# (best val/acc; the test photos were not looked at to choose): printed under a missed goal.
TRIED = """### What was tried (validation split, seed 0)

| photos.yaml variant | best val | train acc., end | `dvc repro` |
|---|---|---|---|
| A. first: mixup 0.2, erasing 0.25, crop 35-100 %, jitter 0.8 | 54.8 % | 57.9 % | 7.9 min |
| B. no mixup or erasing, crop 60-100 %, jitter 0.5 | 62.4 % | 88.9 % | 5.8 min |
| C. B with 3,000 steps | 63.2 % | 96.7 % | 13.8 min * |

A-B: 2,000 steps; B is this photos.yaml. * Cores shared with other work: time inflated.

The first version underfitted (training accuracy below 60 % at the end): on 2,000 photos of
32 px upscaled to 64, its augmentation was more than a 1.2 M-parameter network learns through
in 2,000 steps. `params/cifar10.yaml` (airbench94's techniques at the images' own 32 px:
patch whitening, fixed BN scales, 6-view TTA) is tuned to exactly this data; the photos recipe's
64 px costs 4x the pixels for no information here. Over 3 seeds the gap is 4-6 points, far
outside both intervals: on photos whose real detail is 32 px, `params/cifar10.yaml` is the
recipe to use (the model page says so), and it is also the faster one. `params/photos.yaml` is
for photos larger than ~48 px with their own aspect (residual network, global pooling, crop
resize), where downscaling to 32 px discards detail; no such folder is in ../shared, so that
claim is not measured here. Not tried yet: wider residual networks at the same budget,
TrivialAugment instead of the colour jitter, CutMix."""


def classes_of(images: Path) -> list[str]:
    """CIFAR-10's class names, from its class folders, in label order (alphabetical)."""
    return sorted(folder.name for folder in images.iterdir() if folder.is_dir())


def carve(
    images: Path, dest: Path, classes: Sequence[str], counts: dict[str, int], seed: int
) -> Path:
    """``dest/{train,val,test}/<class>/*.jpg``: disjoint seeded picks of ``images/<class>``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        files = sorted((images / name).iterdir())
        order = rng.permutation(len(files))
        start = 0
        for split, count in counts.items():
            folder = dest / split / name
            folder.mkdir(parents=True)
            for index in order[start : start + count]:
                (folder / files[index].name).symlink_to(files[index])
            start += count
    return dest


def unpack(dest: Path) -> Path:
    """CIFAR-10's train split under ``dest/train/<class>/*.jpg``."""
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(dest, filter="data")
    return dest / "train"


def pipeline_run(
    root: Path, recipes: list[str], values: dict[str, object], data: Path
) -> dict[str, float]:
    """One project copy: recipes, params, ``dvc repro``; test accuracy and wall times."""
    project = Checkout.of_this_one(root)
    for overlay in recipes:
        project.run("convpipe", "recipe", overlay)
    project.set_params(**{"data.source": "imagefolder", "data.path": str(data), **values})
    project.run("dvc", "repro", "augment")  # prepare is not part of the figure
    start = time.perf_counter()
    project.run("dvc", "repro")
    seconds = time.perf_counter() - start
    evaluated = json.loads((project.root / "metrics" / "eval.json").read_text())
    trained = json.loads((project.root / "metrics" / "train.json").read_text())
    return {
        "accuracy": float(evaluated["accuracy"]),
        "accuracy_no_tta": float(trained["test/acc"]),
        "epochs": int(trained["epochs"]),
        "seconds": seconds,
    }


def _source(counts: dict[str, int]) -> str:
    """The fine-tuning source's name in the log: its training photos a class."""
    return f"{counts['train']} a class"


def _done(path: Path, source: str | None = None) -> set[tuple[object, ...]]:
    """The (part, arm, seed) runs already in the log: a rerun goes on where one stopped.

    With ``source``, only the runs fine-tuned from (or compared with) that source count.
    """
    records = read_records(path)
    if source is not None:
        records = [r for r in records if r.get("source", _source(OLD_PRETRAIN)) == source]
    return {(r["part"], r.get("arm"), r.get("seed")) for r in records}


def run_small(images: Path, tmp: Path, seeds: int, log: Path, quick: bool) -> None:
    """Every arm of the small-data comparison, seed by seed."""
    counts = {"train": 20, "val": 10, "test": 10} if quick else SMALL
    data = carve(images, tmp / "small", classes_of(images), counts, seed=0)
    done = _done(log)
    for seed in range(seeds):
        for arm, (recipes, values) in ARMS.items():
            if ("small", arm, seed) in done:
                continue
            extra: dict[str, object] = {"base.seed": seed}
            if quick:
                extra.update(QUICK)
            root = tmp / f"small-{seed}-{len(list(tmp.iterdir()))}"
            figures = pipeline_run(root, recipes, {**values, **extra}, data)
            append_record(log, {"part": "small", "arm": arm, "seed": seed, **figures})


def run_finetune(images: Path, tmp: Path, seeds: int, log: Path, quick: bool) -> None:
    """Pretrain on 8 classes, then fine-tune vs from scratch on the other 2, seed by seed."""
    pre_counts = QUICK_PRETRAIN if quick else PRETRAIN
    new_counts = {"train": 10, "val": 5, "test": 10} if quick else NEW
    old = carve(images, tmp / "eight", classes_of(images)[:8], pre_counts, seed=1)
    new = carve(images, tmp / "two", classes_of(images)[8:], new_counts, seed=2)
    short = QUICK if quick else {}
    source = _source(pre_counts)
    project = Checkout.of_this_one(tmp / "pretrain")
    project.run("convpipe", "recipe", "params/photos.yaml")
    project.set_params(**{"data.path": str(old), **short})
    start = time.perf_counter()
    project.run("dvc", "repro")
    pre = json.loads((project.root / "metrics" / "eval.json").read_text())
    seconds = time.perf_counter() - start
    append_record(
        log,
        {
            "part": "pretrain",
            "source": source,
            "accuracy": float(pre["accuracy"]),
            "seconds": seconds,
        },
    )
    store = f"sqlite:///{project.root / 'mlflow.db'}"
    start_from = {
        "model.init_from": "models:/convpipe-photos@champion",
        "train.freeze_epochs": 2,
        "train.backbone_lr_scale": 0.3,
        "mlflow.tracking_uri": store,
        "mlflow.registered_model": "photos-two-classes",
    }
    done = _done(log, source)
    for seed in range(seeds):
        for arm, values in (("from scratch", {}), ("fine-tuned", start_from)):
            if ("finetune", arm, seed) in done:
                continue
            root = tmp / f"two-{seed}-{arm.replace(' ', '-')}"
            run_values = {**values, **short, "base.seed": seed}
            figures = pipeline_run(root, ["params/photos.yaml"], run_values, new)
            record = {"part": "finetune", "source": source, "arm": arm, "seed": seed, **figures}
            append_record(log, record)


def run_cost(images: Path, tmp: Path, seeds: int, log: Path, quick: bool) -> None:
    """ResNet-18 at 64 px trained by convpipe and by a plain PyTorch loop on the same batches."""
    from bench_loop import CONVPIPE, PLAIN, overhead, prepare, recipe

    from convpipe.config.schema import read_yaml

    if ("cost", None, None) in _done(log):
        return
    counts = {"train": 20, "val": 5, "test": 5} if quick else {"train": 200, "val": 20, "test": 20}
    data = carve(images, tmp / "data", classes_of(images), counts, seed=3)
    network = read_yaml(ROOT / "params" / "resnet18.yaml")["model"]
    overrides = {
        "data.path": str(data),
        "data.image_size": 64,
        # what the plain loop does too: no mixup or class weights there
        "train.mixup_alpha": 0.0,
        "train.class_weights": "none",
        "train.max_steps": None,
        "train.max_epochs": 1 if quick else 2,
        "train.warmup_epochs": 0.5,
        **{f"model.{key}": value for key, value in network.items()},
    }
    params = prepare(recipe(tmp / "project", overrides, ROOT / "params" / "photos.yaml"))
    result = overhead(params, 1 if quick else 3, [CONVPIPE, PLAIN])
    record = {
        "part": "cost",
        "ratios": result.ratios,
        "arm_rows": result.arm_rows,
        "equal": result.equal,
        "worst": result.worst,
        "identical": result.identical,
        "precision": result.precision,
        "train_images": 10 * counts["train"],
    }
    append_record(log, record)


def run_whole(images: Path, tmp: Path, seeds: int, log: Path, quick: bool) -> None:
    """A ~5,000-photo folder, ``convpipe recipe params/photos.yaml``, then all of ``dvc repro``."""
    if ("whole", None, None) in _done(log):
        return
    counts = {"train": 20, "val": 5, "test": 5} if quick else WHOLE
    data = carve(images, tmp / "photos", classes_of(images), counts, seed=4)
    project = Checkout.of_this_one(tmp / "project")
    project.run("convpipe", "recipe", "params/photos.yaml")
    project.set_params(**{"data.path": str(data), **(QUICK if quick else {})})
    start = time.perf_counter()
    project.run("dvc", "repro")  # prepare, augment, init, train, evaluate (and registration)
    seconds = time.perf_counter() - start
    evaluated = json.loads((project.root / "metrics" / "eval.json").read_text())
    trained = json.loads((project.root / "metrics" / "train.json").read_text())
    record = {
        "part": "whole",
        "photos": sum(counts.values()) * len(classes_of(images)),
        "per_class": counts,
        "seconds": seconds,
        "epochs": int(trained["epochs"]),
        "accuracy": float(evaluated["accuracy"]),
    }
    append_record(log, record)


def _table(records: list[dict], arms: Sequence[str]) -> tuple[str, dict[str, tuple[float, float]]]:
    rows, stats = [], {}
    for arm in arms:
        mine = [r for r in records if r.get("arm") == arm]
        if not mine:
            continue
        accuracy = t_interval([r["accuracy"] for r in mine])
        plain = statistics.fmean(r["accuracy_no_tta"] for r in mine)
        minutes = statistics.fmean(r["seconds"] for r in mine) / 60
        epochs = statistics.fmean(r["epochs"] for r in mine)
        stats[arm] = accuracy
        each = ", ".join(f"{100 * r['accuracy']:.1f}" for r in mine)
        rows.append(
            f"| {arm} | {100 * accuracy[0]:.2f} ± {100 * accuracy[1]:.2f} % ({each}) "
            f"| {100 * plain:.2f} % | {epochs:.0f} | {minutes:.1f} min | {len(mine)} |"
        )
    head = (
        "| recipe | test accuracy, mean ± 95 % (per seed) | without TTA | epochs "
        "| `dvc repro` train + evaluate | seeds |\n|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows), stats


def _by_source(records: list[dict], source: str) -> list[dict]:
    return [r for r in records if r.get("source", _source(OLD_PRETRAIN)) == source]


def _paired(tuned: list[dict]) -> tuple[float, float, list[float]] | None:
    """Fine-tuned minus from-scratch accuracy per seed: mean, 95 % half-width, the differences."""
    arms = {(r["arm"], r["seed"]): r["accuracy"] for r in tuned}
    seeds = sorted({seed for arm, seed in arms if ("from scratch", seed) in arms})
    diffs = [
        arms[("fine-tuned", s)] - arms[("from scratch", s)]
        for s in seeds
        if ("fine-tuned", s) in arms
    ]
    if not diffs:
        return None
    mean, half = t_interval(diffs)
    return mean, half, diffs


def _source_note(records: list[dict], source: str) -> str:
    pre = [r for r in records if r["part"] == "pretrain" and r.get("source") == source]
    if not pre:
        return ""
    return (
        f"\n\nThe source: params/photos.yaml on CIFAR-10's other 8 classes ({source}), "
        f"{100 * pre[-1]['accuracy']:.2f} % on their test photos, registered and started "
        "from as `models:/convpipe-photos@champion` (output layer rebuilt for the 2 new "
        "classes, 2 frozen epochs, backbone at 0.3x the rate). The 2 new classes (ship, "
        "truck): 100 training photos each, 200 test photos each. The seeds pair the arms "
        "(same photos, batch order and augmentation draws), so the goal is judged on the "
        "per-seed differences. Caveat on seeds 0 and 1: `train.precision: auto` then timed "
        "bf16 against fp32 before every training, and on cores shared with other work chose "
        "differently from run to run (seed 0 from scratch gave 85.5 % in one run and 87.25 % "
        "in another), so those seeds were not bit-identical across runs. Since then the "
        "measured verdict is kept per machine and network (`~/.cache/convpipe/precision.json`) "
        "and every later training of these arms uses the same one."
    )


def _earlier_note(records: list[dict]) -> str:
    """What the first, weaker source gave (500 photos a class), when the log has it."""
    old = _by_source([r for r in records if r["part"] == "finetune"], _source(OLD_PRETRAIN))
    paired = _paired(old)
    pre = [r for r in records if r["part"] == "pretrain" and "source" not in r]
    if paired is None or not pre:
        return ""
    mean, half, diffs = paired
    each = ", ".join(f"{100 * d:+.2f}" for d in diffs)
    return (
        f"\n\nFirst tried with a weaker source (500 photos a class, {100 * pre[0]['accuracy']:.1f} "
        f"% on its test photos): fine-tuned minus from scratch {100 * mean:+.2f} ± "
        f"{100 * half:.2f} points over {len(diffs)} paired seeds ({each})"
        + (", an interval that includes 0" if mean - half <= 0 else "")
        + ". A source that reaches 64 % on its own classes gives features only a little "
        "better than random ones, so the source now trains on 2,500 photos a class."
    )


def _finetune_section(records: list[dict], quick: bool) -> Section | None:
    source = _source(QUICK_PRETRAIN if quick else PRETRAIN)
    tuned = _by_source([r for r in records if r["part"] == "finetune"], source)
    goal = "fine-tuning beats training from scratch: the paired 95 % interval above 0"
    title = "Fine-tuning on 2 new classes, 100 photos each"
    if not tuned:
        earlier = _earlier_note(records)
        return (
            Section(title, goal, None, "not run with the current source yet", earlier)
            if earlier
            else None
        )
    body, _ = _table(tuned, ["from scratch", "fine-tuned"])
    paired = _paired(tuned)
    met = None
    summary = "incomplete"
    if paired is not None:
        mean, half, diffs = paired
        n = len(diffs)
        met = None if quick or n < 3 else mean - half > 0
        summary = (
            f"fine-tuned minus from scratch: {100 * mean:+.2f} ± {100 * half:.2f} points "
            f"(95 % t interval over {n} paired seeds)"
        )
    why = _why_missed(paired) if met is False and paired is not None else ""
    return Section(
        title,
        goal,
        met,
        summary,
        body + why + _source_note(records, source) + _earlier_note(records),
    )


def _why_missed(paired: tuple[float, float, list[float]]) -> str:
    """Why the paired interval does not clear 0, from the figures themselves."""
    mean, _, diffs = paired
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    each = ", ".join(f"{100 * d:+.2f}" for d in diffs)
    return (
        f"\n\n**Why missed.** The per-seed differences ({each} points) scatter by "
        f"{100 * spread:.1f} points (one of the 400 test photos is 0.25), "
        f"more than their mean ({100 * mean:+.2f}), so {len(diffs)} seeds cannot separate the "
        "arms. The source is weak for this: a network that reaches 68 % on 8 CIFAR classes at "
        "64 px, trained here on 2 CPU cores, is far from the ImageNet-trained backbones that "
        "make fine-tuning a clear win in practice (none can be downloaded here), and both arms "
        "train the same 200 epochs, in which training from scratch on 200 photos with the "
        "recipe's augmentation catches up. What fine-tuning does give here: a steadier result "
        "(the fine-tuned arm's interval is about half as wide). Not measured: the two arms at a "
        "short equal budget, where a trained start matters most."
    )


def report(log: Path, quick: bool) -> list[Section]:
    """The sections of RESULTS_PHOTOS.md from the runs in ``log``."""
    records = read_records(log)
    sections = []
    small = [r for r in records if r["part"] == "small"]
    if small:
        body, stats = _table(small, list(ARMS))
        photos = stats.get("photos.yaml (64 px)")
        others = [v for k, v in stats.items() if k != "photos.yaml (64 px)"]
        met = None
        summary = "no photos.yaml run"
        if photos and others:
            best = max(others, key=lambda v: v[0])
            lead = photos[0] - best[0]
            cleared = photos[0] - photos[1] > best[0] + best[1]
            met = None if quick else (lead >= GOAL_MARGIN and cleared)
            summary = (
                f"photos.yaml {100 * photos[0]:.2f} % against the best other recipe's "
                f"{100 * best[0]:.2f} %: {100 * lead:+.2f} points"
            )
        note = (
            "\n\n2,000 training photos (200 a class), 500 validation, 1,000 test (100 a class), "
            "carved from CIFAR-10's train split (JPEG, 32 px). The intervals are 95 % t "
            "intervals over the seeds (`base.seed`: weights, batch order, augmentation). "
            "The times come from runs that shared the 2 cores with other work: they "
            "rank the recipes only roughly."
        )
        fewest = min(sum(1 for r in small if r["arm"] == arm) for arm in stats)
        if fewest < 3:
            note += (
                f" Only {fewest} seed(s) so far: below the 3 the goal needs, so it cannot be met "
                "yet; `python benchmarks/bench_photos.py --log benchmarks/RESULTS_PHOTOS.jsonl` "
                "goes on from these runs (each arm's seeds not yet in the log)."
            )
        if met is False:
            body += "\n\n" + TRIED
        goal = "photos.yaml beats the best other recipe by >= 5 points, intervals apart"
        sections.append(
            Section("Few photos a class (CIFAR-10 subset)", goal, met, summary, body + note)
        )
    finetune = _finetune_section(records, quick)
    if finetune is not None:
        sections.append(finetune)
    cost = [r for r in records if r["part"] == "cost"]
    if cost:
        c = cost[-1]
        ratio = statistics.median(c["ratios"])
        body = (
            "| arm | images/s | seconds per run | ratio to the plain loop |\n|---|---|---|---|\n"
            f"{c['arm_rows']}\n\nResNet-18 (`params/resnet18.yaml`'s network) at 64 px on "
            f"{c['train_images']:,} photos, `params/photos.yaml`'s training without mixup and "
            f"class weights (the plain loop has neither), precision {c['precision']}, 2 epochs a "
            "run, 3 rounds after a warm-up; both arms read the same seeded batches "
            f"(identical initial weights: {c['identical']}; per-epoch losses equal: {c['equal']}, "
            f"largest difference {c['worst']:.1e})."
        )
        lowest = min(c["ratios"])
        met = None if quick else lowest >= 0.95  # every round, not only the median
        summary = (
            f"convpipe / plain loop throughput: {ratio:.3f} (median of {len(c['ratios'])} "
            f"rounds, lowest {lowest:.3f})"
        )
        sections.append(
            Section("Training cost: ResNet-18 at 64 px", "ratio >= 0.95", met, summary, body)
        )
    whole = [r for r in records if r["part"] == "whole"]
    if whole:
        w = whole[-1]
        minutes = w["seconds"] / 60
        met = None if quick else w["seconds"] <= WHOLE_BUDGET
        summary = f"{w['photos']:,} photos: {minutes:.1f} min for all of `dvc repro`"
        body = (
            f"`convpipe recipe params/photos.yaml`, `data.path` set to {w['photos']:,} CIFAR-10 "
            f"photos (10 classes; {w['per_class']['train']} training, {w['per_class']['val']} "
            f"validation and {w['per_class']['test']} test photos a class), then "
            f"`dvc repro` from nothing: prepare, augment, init, train ({w['epochs']} epochs), "
            f"evaluate and registration in {minutes:.1f} min on the cores of the machine above, "
            f"test accuracy {100 * w['accuracy']:.1f} %. One run (a wall time, not a "
            "comparison); the photos are CIFAR's 32 px JPEGs, upscaled to the recipe's 64 px."
        )
        sections.append(
            Section(
                "A 5,000-photo folder through the whole pipeline", "<= 15 min", met, summary, body
            )
        )
    return sections


def write_report(log: Path, output: Path | None, quick: bool) -> None:
    """Print the report of the runs in ``log``, or write it as a results file (run_all's form)."""
    write_results(report(log, quick), log, output, "bench_photos", quick)


def run(
    quick: bool = False,
    parts: Sequence[str] = PARTS,
    seeds: int = 3,
    log: Path | None = None,
) -> list[Section]:
    """Run the parts, then report every run in the log."""
    title = "Photos with few images a class"
    if not CIFAR_TAR.is_file():
        return [Section(title, "-", None, f"Skipped: {CIFAR_TAR} not found.")]
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        log = log or Path(tmp) / "runs.jsonl"
        images = unpack(Path(tmp) / "cifar")
        work = Path(tmp) / "work"
        work.mkdir()
        runners = {
            "small": run_small,
            "finetune": run_finetune,
            "cost": run_cost,
            "whole": run_whole,
        }
        for part in parts:
            (work / part).mkdir()
            runners[part](images, work / part, 1 if quick else seeds, log, quick)
        return report(log, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few images and steps: a smoke run")
    parser.add_argument("--part", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--log", type=Path, help="JSON-lines file the runs are appended to")
    parser.add_argument("--report", action="store_true", help="only report the runs in --log")
    parser.add_argument("--output", type=Path, help="with --report: the results file to write")
    args = parser.parse_args()
    if args.report:
        write_report(args.log, args.output, args.quick)
        return
    print_sections(run(args.quick, args.part, args.seeds, args.log))


if __name__ == "__main__":
    main()

"""Streaming data at scale: ``data.format: litdata`` against ``npy`` on a large image folder.

A synthetic set of 200,000 RGB 64x64 JPEGs in 10 class folders (per-class colour gradients
and shapes plus noise, ~2 KB a file, so JPEG cannot squeeze them to nothing) is generated in
a temporary folder by 2 processes (its time is printed and counts towards no figure; nothing
is kept). Then, for each format:

* **prepare**: the real ``pipelines/prepare.py`` in a subprocess on that folder
  (``data.source: imagefolder``), as ``bench_prepare.py`` runs it: images/s over the whole
  stage (probe, split, decode, write) and the process's own peak RSS (``VmHWM``), with the
  peak anonymous memory of the stage and its decode workers together beside it (``VmHWM``
  counts the pages of npy's memory-mapped output, which grow with the dataset, and none of
  the workers prepare forks);
* **disk**: the bytes of the prepared folder (sum of its files' sizes) and per image;
* **training reads**: images/s delivered to the model, one process and two (CPU DDP,
  ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``), through
  ``ConvDataModule.train_dataloader()`` with the normalising transform, as training sees it
  (global batch 256, ``runtime.num_workers: 0``). The model is a single scalar (loss: that
  scalar times the batch mean), so the figure is the data path's, not the CNN's. Each run
  is a subprocess of this file (``--read-worker``; Lightning's DDP launcher starts rank 1
  by running it again); every rank times each epoch from its 20th batch on (fewer on small
  sets) and writes its figures to a JSON file. Two processes report their total images/s.

Every image a rank trains on is fingerprinted (a hash of a strided sample of its normalised
pixels, outside the timed span); with two processes and litdata the benchmark asserts that
the ranks together saw every training image at most once and at least
``N_train - world x batch`` of them in every epoch, both by the distinct fingerprints and by
each rank's batches x batch size against the manifest's train count.

For scale, params.yaml's CNN (the digits recipe's model) is timed training at the same size
(3x64x64, batch 256, fp32 and bf16 autocast, the faster counts): it is far slower than the
data path (a few hundred images/s against thousands), so a read rate above it never
starves training.

Goal: litdata prepares within 2x of npy's images/s with a bounded peak memory (< 1 GiB),
and both formats read faster than the CNN trains, in one and two processes.

Prepare runs once per format at 200,000 images (3 times up to 50,000 images: median); reads
are the median over the epochs of one run (1 epoch above 50,000 images, else 3). A full run
takes ~5 minutes on 2 otherwise idle cores and ~9 on busy ones (scaled from 60,000-image runs
of 2.1 and 3.6 minutes, ~80 s of which do not grow: process starts, the CNN's steps);
``--quick`` (3,000 images) takes about a minute.

An end-to-end ``dvc repro`` of a fresh copy of the project on the same set in ``litdata`` (one
epoch of a one-block CNN) checks that the whole pipeline trains and evaluates a large streamed
set, and reports its time and test accuracy.

Too long for ``make bench``'s budget: ``make bench-streaming`` (``--results``) writes this
section into ``benchmarks/RESULTS.md`` as a block of its own, which ``make bench`` carries over.

Usage: python benchmarks/bench_streaming.py [--quick] [--images N] [--results]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prepare import GOAL_RSS, base_params, run_prepare
from common import Checkout, Section, fmt, machine_info, print_sections
from results_file import put_section

from convpipe.config.edit import write_values

IMAGES = 200_000
QUICK_IMAGES = 3_000
SIZE = 64  # pixels, square, RGB
CLASSES = 10
JPEG_QUALITY = 90
GEN_CHUNK = 2_000  # images per generation task
GLOBAL_BATCH = 256
WARMUP = 20  # batches of each epoch left out of its time
FORMATS = ("npy", "litdata")
#: the training-read runs of each format: column label -> processes
READS = {"1 process": 1, "2 processes": 2}
GOAL_PREPARE_RATIO = 0.5  # litdata's prepare images/s over npy's
CNN_STEPS = 4  # timed CNN training steps (after 2 warm-up steps)
STRIDE = 37  # every STRIDE-th normalised value of an image goes into its fingerprint
_DDP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")

# ------------------------------------------------------------------ the synthetic image folder

# per class: gradient start, gradient end, shape colour
_PALETTE = np.random.default_rng(2024).uniform(20, 235, (CLASSES, 3, 3)).astype(np.float32)


@functools.cache
def _noise_bank() -> np.ndarray:
    """Noise tiles (std 10) the images draw theirs from: drawing 12,288 normals an image
    would cost more than the JPEG encoding."""
    return 10.0 * np.random.default_rng(11).standard_normal((256, SIZE, SIZE, 3), np.float32)


def draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(B, SIZE, SIZE, 3)`` images: a class-coloured gradient, a shape, noise.

    Odd classes get a square, even ones a disc, at a random place and size; the gradient's
    direction is random. The noise (std 10, one of 256 tiles) keeps JPEG files at a
    realistic ~2 KB.
    """
    b = labels.size
    grid = np.arange(SIZE, dtype=np.float32) / (SIZE - 1) - 0.5
    yy, xx = grid[None, :, None], grid[None, None, :]
    angle = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
    t = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + 0.5, 0.0, 1.0)[..., None]
    start, end, shape = (_PALETTE[labels, k][:, None, None, :] for k in range(3))
    image = (end - start) * t
    image += start
    cy, cx = (rng.uniform(-0.25, 0.25, (b, 1, 1)).astype(np.float32) for _ in range(2))
    radius = rng.uniform(0.1, 0.3, (b, 1, 1)).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    square = (labels % 2 == 1)[:, None, None]
    inside = np.where(
        square, np.maximum(abs(dx), abs(dy)) < radius, dx * dx + dy * dy < radius * radius
    )
    np.copyto(image, np.broadcast_to(shape, image.shape), where=inside[..., None])
    image += _noise_bank()[rng.integers(0, len(_noise_bank()), b)]
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_chunk(task: tuple[str, int, int]) -> int:
    """Write images ``start..stop-1`` (class ``i % CLASSES``) as JPEGs under ``root``."""
    from PIL import Image

    root, start, stop = task
    labels = np.arange(start, stop) % CLASSES
    images = draw(labels, np.random.default_rng([7, start]))
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start):
        Image.fromarray(image).save(f"{root}/c{label}/{i:07d}.jpg", quality=JPEG_QUALITY)
    return stop - start


def make_images(root: Path, count: int, processes: int = 2) -> float:
    """Write ``count`` JPEGs in ``CLASSES`` folders under ``root``; return the seconds taken."""
    start = time.perf_counter()
    for label in range(CLASSES):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
    tasks = [(str(root), s, min(s + GEN_CHUNK, count)) for s in range(0, count, GEN_CHUNK)]
    # spawn: the parent may hold torch's thread pools, which a fork would inherit broken
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(_write_chunk, tasks))
    assert written == count
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    """The sum of the sizes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------- prepare


@dataclass
class Format:
    """One data format's figures."""

    name: str
    prepared: Path
    prepare_rates: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    anon: list[float] = field(default_factory=list)
    disk: int = 0
    reads: dict[str, Read] = field(default_factory=dict)


def prepare(name: str, source: Path, images: int, work: Path, repeats: int) -> Format:
    """Run the prepare stage ``repeats`` times in ``format: name``; keep its last output."""
    work.mkdir(parents=True, exist_ok=True)
    case = Format(name, work / "prepared")
    for _ in range(repeats):
        params = base_params()
        params["data"].update(source="imagefolder", path=str(source), format=name)
        params["paths"]["prepared"] = str(case.prepared)
        seconds, peak, anon = run_prepare(params, work)
        case.prepare_rates.append(images / seconds)
        case.rss.append(peak)
        case.anon.append(anon)
        print(
            f"  prepare {name}: {images / seconds:,.0f} images/s, peak RSS {peak:,.0f} MiB, "
            f"anonymous with its workers {anon:,.0f} MiB",
            flush=True,
        )
    case.disk = folder_bytes(case.prepared)
    print(f"  disk {name}: {case.disk / 2**20:,.1f} MiB", flush=True)
    return case


# ------------------------------------------------------------- training reads (the worker)


def fingerprints(images: Any) -> np.ndarray:
    """A 64-bit hash per image of a strided sample of its normalised values."""
    rows = images.reshape(images.shape[0], -1)[:, ::STRIDE].contiguous().numpy()
    return np.array(
        [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest()) for r in rows],
        dtype=np.uint64,
    )


def _probe_module(warmup: int) -> Any:
    """A LightningModule with one scalar that times the batches it is handed, per epoch."""
    import lightning as L
    import torch

    class ReadProbe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.stamps: list[float] = []
            self.sizes: list[int] = []
            self.hashing: list[float] = []
            self.prints: list[np.ndarray] = []
            self.epochs: list[dict[str, Any]] = []
            self.epoch_prints: list[np.ndarray] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, _ = batch
            self.stamps.append(time.perf_counter())
            self.sizes.append(int(images.shape[0]))
            self.prints.append(fingerprints(images))
            self.hashing.append(time.perf_counter() - self.stamps[-1])
            return self.w * images.mean()

        def on_train_epoch_end(self) -> None:
            warm = min(warmup, len(self.stamps) // 4)
            # batches warm+1.. were fetched between stamps[warm] and stamps[-1]
            span = self.stamps[-1] - self.stamps[warm] - sum(self.hashing[warm:-1])
            timed = sum(self.sizes[warm + 1 :])
            self.epochs.append(
                {
                    "batches": len(self.sizes),
                    "images": sum(self.sizes),
                    "batch": max(self.sizes),
                    "warmup": warm,
                    "timed_images": timed,
                    "seconds": span,
                }
            )
            self.epoch_prints.append(np.concatenate(self.prints))
            self.stamps, self.sizes, self.hashing, self.prints = [], [], [], []

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return ReadProbe()


def status_mib(key: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (e.g. ``VmHWM:``), in MiB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(key)).split()[1]) / 1024


class AnonWatch(threading.Thread):
    """Samples this process's anonymous RSS every 10 ms and keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0

    def run(self) -> None:
        """Sample until the process exits."""
        while True:
            self.peak = max(self.peak, status_mib("RssAnon:"))
            time.sleep(0.01)


def read_worker(args: argparse.Namespace) -> None:
    """Train the probe for ``args.epochs`` epochs; each rank writes ``out.rank<r>.json/.npz``.

    The Trainer is the train stage's as far as the data path goes (``build_trainer``'s
    ``deterministic=True`` and ``use_distributed_sampler=False``).
    """
    import lightning as L
    import torch

    from convpipe.data.datamodule import ConvDataModule
    from convpipe.hardware import cpu_threads

    warnings.filterwarnings("ignore")
    watch = AnonWatch()
    watch.start()
    devices = args.devices
    torch.set_num_threads(cpu_threads("auto", devices))
    datamodule = ConvDataModule(
        prepared_dir=args.prepared,
        augmented_dir=None,
        batch_size=GLOBAL_BATCH,
        num_workers=args.num_workers,
        online=False,
        seed=42,
        batch_transform="auto",
        resident=False,
    )
    model = _probe_module(WARMUP)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # as the train stage: the DataModule shards itself
        deterministic=True,
        default_root_dir=str(args.out.parent),
    )
    trainer.fit(model, datamodule=datamodule)
    rank, out = trainer.global_rank, args.out
    record = {
        "rank": rank,
        "world": trainer.world_size,
        "train_count": datamodule.manifest.splits["train"].count,
        "loader": type(trainer.train_dataloader).__name__,
        "epochs": model.epochs,
        "peak_rss_mib": status_mib("VmHWM:"),
        "peak_anon_mib": max(watch.peak, status_mib("RssAnon:")),
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    np.savez(f"{out}.rank{rank}.npz", *model.epoch_prints)


# ------------------------------------------------------------- training reads (the parent)


@dataclass
class Read:
    """One training-read run: per-epoch total images/s and what the ranks saw."""

    devices: int
    rates: list[float]
    train_count: int
    batch: int  # per rank
    batches: list[list[int]]  # [epoch][rank]
    seen: list[int]  # distinct images per epoch, over all ranks
    served: list[int]  # images handed out per epoch, over all ranks
    peak_rss: float
    peak_anon: float
    loader: str


def _epoch_rate(ranks: list[dict[str, Any]], epoch: int) -> float:
    """Total images/s of ``epoch`` over the ranks (they step together under DDP)."""
    images = sum(r["epochs"][epoch]["timed_images"] for r in ranks)
    return images / max(r["epochs"][epoch]["seconds"] for r in ranks)


def read_run(prepared: Path, devices: int, epochs: int) -> Read:
    """Run :func:`read_worker` in a subprocess; gather every rank's figures."""
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-read-") as tmp:
        out = Path(tmp) / "read"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--read-worker"]
        cmd += ["--prepared", str(prepared), "--devices", str(devices)]
        cmd += ["--epochs", str(epochs), "--out", str(out)]
        env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
        env.update(TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"read worker failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(devices)]
        prints = []
        for r in range(devices):
            with np.load(f"{out}.rank{r}.npz") as saved:
                prints.append([saved[f"arr_{e}"] for e in range(epochs)])
    per_epoch = [np.concatenate([p[e] for p in prints]) for e in range(epochs)]
    return Read(
        devices=devices,
        rates=[_epoch_rate(ranks, e) for e in range(epochs)],
        train_count=int(ranks[0]["train_count"]),
        batch=int(ranks[0]["epochs"][0]["batch"]),
        batches=[[int(r["epochs"][e]["batches"]) for r in ranks] for e in range(epochs)],
        seen=[int(np.unique(p).size) for p in per_epoch],
        served=[int(p.size) for p in per_epoch],
        peak_rss=max(float(r["peak_rss_mib"]) for r in ranks),
        peak_anon=max(float(r["peak_anon_mib"]) for r in ranks),
        loader=str(ranks[0]["loader"]),
    )


def coverage(read: Read) -> tuple[bool, str]:
    """Whether every epoch saw each training image at most once and all but world x batch.

    Checked two ways: the distinct fingerprints against the images served (at most once),
    and the ranks' batches x batch size against the manifest's train count (at least).
    """
    floor = read.train_count - read.devices * read.batch
    ok = True
    parts = []
    for e, (seen, served, batches) in enumerate(
        zip(read.seen, read.served, read.batches, strict=True)
    ):
        slots = sum(batches) * read.batch
        enough = seen >= floor and floor <= slots < read.train_count + read.devices * read.batch
        ok = ok and seen == served and enough
        parts.append(
            f"epoch {e}: batches per rank {batches} x {read.batch} = {slots:,}, "
            f"{served:,} images served, {seen:,} distinct of {read.train_count:,}"
        )
    return ok, f"floor {floor:,}; " + "; ".join(parts)


# ---------------------------------------------------------------------- the CNN, for scale


def _cnn_steps(net: Any, bf16: bool, steps: int) -> float:
    """Images/s of ``steps`` Adam steps on one random batch (after 2 untimed ones)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,))
    times = []
    for _ in range(2 + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return GLOBAL_BATCH / statistics.median(times[2:])


def cnn_rate(steps: int) -> tuple[float, str]:
    """Images/s params.yaml's CNN trains at on 3x64x64 batches of 256 (the faster precision).

    Timed in this process without deterministic algorithms (an earlier benchmark of
    run_all may have left them on): the CNN at its fastest, the hardest bar for the reads.
    """
    import torch

    from convpipe.config.schema import parse_params
    from convpipe.hardware import cpu_threads
    from convpipe.models.network import build_cnn

    model = parse_params(base_params()).model
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cpu_threads("auto", 1))
    torch.use_deterministic_algorithms(False)
    rates = {}
    try:
        for name, bf16 in (("fp32", False), ("bf16-mixed", True)):
            torch.manual_seed(0)
            net = build_cnn(model, 3, (SIZE, SIZE), CLASSES)
            rates[name] = _cnn_steps(net.to(memory_format=torch.channels_last), bf16, steps)
            print(f"  CNN ({name}): {rates[name]:,.0f} images/s", flush=True)
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
    best = max(rates, key=lambda k: rates[k])
    return rates[best], best


# ---------------------------------------------------------------------------------- report


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def table(cases: dict[str, Format], images: int) -> list[str]:
    """Markdown rows: one per format, then litdata/npy."""
    rows = [
        "| format | prepare images/s | peak RSS (MiB) | anonymous, with workers (MiB) | disk (MiB) "
        "| bytes/image | " + " | ".join(f"read images/s, {label}" for label in READS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(READS),
    ]
    for case in cases.values():
        reads = " | ".join(fmt(case.reads[label].rates, 0) for label in READS)
        rows.append(
            f"| {case.name} | {fmt(case.prepare_rates, 0)} | {fmt(case.rss, 0)} "
            f"| {fmt(case.anon, 0)} | {case.disk / 2**20:,.1f} | {case.disk / images:,.0f} "
            f"| {reads} |"
        )
    lit, npy = cases["litdata"], cases["npy"]
    reads = " | ".join(_ratio(lit.reads[k].rates, npy.reads[k].rates) for k in READS)
    rows.append(
        f"| litdata / npy | {_ratio(lit.prepare_rates, npy.prepare_rates)} "
        f"| {_ratio(lit.rss, npy.rss)} | {_ratio(lit.anon, npy.anon)} "
        f"| {lit.disk / npy.disk:.2f} | {lit.disk / npy.disk:.2f} | {reads} |"
    )
    return rows


def verdict(cases: dict[str, Format], cnn: float) -> list[str]:
    """The goal's misses, in words (none: met)."""
    misses = []
    lit, npy = cases["litdata"], cases["npy"]
    ratio = statistics.median(lit.prepare_rates) / statistics.median(npy.prepare_rates)
    if ratio < GOAL_PREPARE_RATIO:
        misses.append(f"litdata prepares at {ratio:.2f}x npy's images/s (goal >= 0.5x)")
    if max(lit.rss) >= GOAL_RSS:
        misses.append(f"litdata's prepare peaks at {max(lit.rss):,.0f} MiB (goal < 1 GiB)")
    for case in cases.values():
        for label, read in case.reads.items():
            rate = statistics.median(read.rates)
            if rate <= cnn:
                misses.append(f"{case.name} reads {rate:,.0f} images/s ({label})")
    return misses


def _memory_note(cases: dict[str, Format]) -> str:
    """Peak memory of prepare and of the read processes, and what the npy peak is made of."""
    npy = cases["npy"]
    reads = ", ".join(
        f"{c.name} {label} {r.peak_rss:,.0f} ({r.peak_anon:,.0f})"
        for c in cases.values()
        for label, r in c.reads.items()
    )
    text = (
        "- Memory: peak RSS is the prepare process's own `VmHWM` (bench_prepare's figure), "
        "which counts the pages of files it maps but none of its decode workers (one per core "
        'from 4,096 images); "anonymous, with workers" is the peak sum of their `Pss_Anon` '
        "(sampled every 50 ms): the memory the stage holds, shared pages counted once. Read "
        f"processes, peak RSS (peak `RssAnon`, sampled every 10 ms) per process in MiB: {reads}; "
        "both formats map their training images (npy's memmap, LitData's chunk files), so "
        "their peak RSS grows with the split while the anonymous part stays put."
    )
    if max(npy.rss) >= GOAL_RSS:
        text += (
            f" npy's prepare peaks at {max(npy.rss):,.0f} MiB RSS against "
            f"{max(npy.anon):,.0f} MiB anonymous: the difference is its memory-mapped output's "
            "written pages, which grow with the dataset (page cache, but counted against a "
            "container's memory limit)."
        )
    return text


def _coverage_note(cases: dict[str, Format], ctx: dict[str, Any]) -> str:
    read = cases["litdata"].reads["2 processes"]
    served = "; ".join(
        f"{c.name} {label}: {r.served[0]:,} served, {r.seen[0]:,} distinct"
        for c in cases.values()
        for label, r in c.reads.items()
    )
    return (
        "- litdata, 2 processes: every training image at most once and at least "
        f"N_train - 2 x {read.batch} times per epoch: **{'yes' if ctx['covered'] else 'NO'}** "
        f"({ctx['coverage']}). First epoch, all runs: {served} (npy's DDP sampler pads a "
        "split of odd length with repeats; LitData drops the images that would leave the "
        "ranks unequal)."
    )


def notes(cases: dict[str, Format], ctx: dict[str, Any]) -> list[str]:
    """What was run, the generation time, memory, the coverage check and the CNN's rate."""
    lit = cases["litdata"]
    read = lit.reads["2 processes"]
    return [
        f"- Source: {ctx['images']:,} RGB {SIZE}x{SIZE} JPEGs (quality {JPEG_QUALITY}, "
        f"{ctx['source_mib']:,.0f} MiB) in {CLASSES} class folders, generated in "
        f"{ctx['generation']:.0f} s (not part of any figure); train split "
        f"{read.train_count:,} images.",
        f"- Prepare: a fresh `pipelines/prepare.py` process per run, {len(lit.prepare_rates)} "
        "run(s) per format (median); images/s over the whole stage (probe, split, decode, "
        "write). Disk: the sum of the prepared folder's file sizes (raw pixels are "
        f"{SIZE * SIZE * 3:,} bytes/image).",
        f"- Reads: global batch {GLOBAL_BATCH}, runtime.num_workers 0, the normalising "
        "transform in the loader, the train stage's `Trainer(deterministic=True, "
        f"use_distributed_sampler=False)`; median over {len(read.rates)} epoch(s) of one run, "
        f"each timed from its batch {ctx['warmup']} on, from the page cache (the folders were "
        f"just written); 2 processes: CPU DDP, 1 torch thread each, {GLOBAL_BATCH // 2} "
        f"images a rank and step, total images/s over both ranks. litdata's loader: "
        f"{read.loader}.",
        _memory_note(cases),
        _coverage_note(cases, ctx),
        f"- For scale: params.yaml's CNN trains at {ctx['cnn']:,.0f} images/s on "
        f"3x{SIZE}x{SIZE} batches of {GLOBAL_BATCH} ({ctx['cnn_precision']}, the faster of "
        "fp32 and bf16-mixed, 1 process, 2 threads); the slowest read is "
        f"{ctx['slowest'] / ctx['cnn']:,.1f}x that: the data path is far from the bottleneck.",
        _e2e_note(ctx["e2e"]),
    ]


def _e2e_note(e2e: dict[str, Any]) -> str:
    return (
        "- End to end: `dvc repro` of a fresh copy of the project on the same set with "
        "`data.format: litdata`, `augment.copies: 0`, one epoch of a one-block CNN "
        f"(stages run: {', '.join(e2e['stages'])}): {e2e['seconds'] / 60:.1f} min in all, "
        f"training at {e2e['train images/s']:,.0f} images/s, test accuracy "
        f"{e2e['accuracy']:.4f} on {e2e['test images']:,} images."
    )


def _read_all(cases: dict[str, Format], epochs: int) -> None:
    """Every training-read run of :data:`READS`, for each format."""
    for case in cases.values():
        for label, devices in READS.items():
            read = read_run(case.prepared, devices, epochs)
            case.reads[label] = read
            print(
                f"  read {case.name}, {label}: {fmt(read.rates, 0, ' images/s')}, peak RSS "
                f"{read.peak_rss:,.0f} MiB (anonymous {read.peak_anon:,.0f})",
                flush=True,
            )


#: The end-to-end run's model: one strided conv block and a global pool (a few thousand
#: images/s on 2 cores), so one epoch of the whole set fits the benchmark's budget. The point
#: is the pipeline on a large streamed set, not its accuracy.
E2E_MODEL = {
    "conv": [
        {
            "filters": 16,
            "kernel": 3,
            "stride": 2,
            "padding": "same",
            "activation": "relu",
            "batch_norm": True,
            "pool": "max",
            "pool_size": 2,
        }
    ],
    "global_pool": "avg",
    "hidden": [],
}


def end_to_end(source: Path, work: Path) -> dict[str, Any]:
    """``dvc repro`` of a fresh copy of the project on the generated set in litdata: times
    of the whole pipeline (prepare, augment, train one epoch, evaluate) and test accuracy."""
    checkout = Checkout.of_this_one(work / "project")
    values = {
        "data.source": "imagefolder",
        "data.path": str(source),
        "data.format": "litdata",
        "augment.copies": 0,
        "train.max_epochs": 1,
        "train.batch_size": GLOBAL_BATCH,
        "train.precision": "32-true",
        **{f"model.{key}": value for key, value in E2E_MODEL.items()},
    }
    write_values(checkout.root / "params.yaml", values, "bench_streaming")
    start = time.perf_counter()
    proc = checkout.run("dvc", "repro")
    seconds = time.perf_counter() - start
    evaluated = json.loads((checkout.root / "metrics/eval.json").read_text())
    trained = json.loads((checkout.root / "metrics/train.json").read_text())
    ran = [s for s in ("prepare", "augment", "train", "evaluate") if f"stage '{s}'" in proc.stdout]
    return {
        "seconds": seconds,
        "stages": ran,
        "accuracy": float(evaluated["accuracy"]),
        "test images": int(evaluated["count"]),
        "train images/s": float(trained["cost/images_per_s"]),
    }


def measure(images: int, quick: bool, work: Path) -> tuple[dict[str, Format], dict[str, Any]]:
    """Generate the set, prepare it in both formats, time the reads and the CNN."""
    source = work / "images"
    print(f"  generating {images:,} {SIZE}x{SIZE} JPEGs ...", flush=True)
    generation = make_images(source, images)
    ctx: dict[str, Any] = {"images": images, "generation": generation}
    ctx["source_mib"] = folder_bytes(source) / 2**20
    print(
        f"  wrote {images:,} images ({ctx['source_mib']:,.0f} MiB) in {generation:.1f} s",
        flush=True,
    )
    repeats = 1 if quick or images > 50_000 else 3
    cases = {name: prepare(name, source, images, work / name, repeats) for name in FORMATS}
    ctx["e2e"] = end_to_end(source, work / "e2e")
    print(f"  dvc repro in litdata, end to end: {ctx['e2e']}", flush=True)
    shutil.rmtree(work / "e2e")
    shutil.rmtree(source)  # the reads need only the prepared folders
    _read_all(cases, 2 if quick else 3 if images <= 50_000 else 1)
    batches = min(cases["npy"].reads["1 process"].batches[0])
    ctx["warmup"] = min(WARMUP, batches // 4)
    ctx["covered"], ctx["coverage"] = coverage(cases["litdata"].reads["2 processes"])
    print(f"  litdata DDP coverage ok: {ctx['covered']} ({ctx['coverage']})", flush=True)
    ctx["cnn"], ctx["cnn_precision"] = cnn_rate(2 if quick else CNN_STEPS)
    ctx["slowest"] = min(
        statistics.median(r.rates) for c in cases.values() for r in c.reads.values()
    )
    return cases, ctx


def _summary(cases: dict[str, Format], ctx: dict[str, Any]) -> str:
    lit, npy = cases["litdata"], cases["npy"]

    def reads(case: Format) -> str:
        return " / ".join(f"{statistics.median(r.rates):,.0f}" for r in case.reads.values())

    return (
        f"{ctx['images']:,} {SIZE}x{SIZE} JPEGs: prepare litdata/npy "
        f"{_ratio(lit.prepare_rates, npy.prepare_rates)}x images/s, peak RSS litdata "
        f"{max(lit.rss):,.0f} / npy {max(npy.rss):,.0f} MiB, disk {lit.disk / npy.disk:.2f}x; "
        f"reads ({' / '.join(READS)}) litdata {reads(lit)}, npy {reads(npy)} images/s; "
        f"CNN {ctx['cnn']:,.0f} images/s."
    )


def run(quick: bool = False, images: int | None = None) -> list[Section]:
    """Measure both formats on a generated set of ``images`` JPEGs; one section."""
    count = images or (QUICK_IMAGES if quick else IMAGES)
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-streaming-") as tmp:
        cases, ctx = measure(count, quick, Path(tmp))
    if not ctx["covered"]:
        raise AssertionError(f"litdata under DDP did not cover the epoch: {ctx['coverage']}")
    misses = verdict(cases, ctx["cnn"])
    body = [*table(cases, count), "", *notes(cases, ctx)]
    if misses:
        body.append(f"- Goal missed: {'; '.join(misses)}.")
    if not {"prepare", "train", "evaluate"} <= set(ctx["e2e"]["stages"]):
        raise AssertionError(f"dvc repro did not run the pipeline: {ctx['e2e']}")
    return [
        Section(
            title="Streaming data (litdata vs npy)",
            goal=(
                "litdata prepare >= 0.5x npy's images/s with peak RSS < 1 GiB; training reads "
                "of both formats faster than the CNN trains (1 and 2 processes)"
            ),
            met=not misses,
            summary=_summary(cases, ctx),
            body="\n".join(body),
        )
    ]


def main() -> None:
    """Print the section, or (``--read-worker``) run one training-read process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES:,} images, 2 epochs")
    parser.add_argument("--images", type=int, help=f"images to generate (default {IMAGES:,})")
    parser.add_argument("--read-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--results",
        action="store_true",
        help="write the section into benchmarks/RESULTS.md (its own block: make bench keeps it)",
    )
    args = parser.parse_args()
    if args.read_worker:
        read_worker(args)
        return
    sections = run(quick=args.quick, images=args.images)
    if not args.results:
        print_sections(sections)
        return
    if args.quick or args.images:
        raise SystemExit("only a full run writes RESULTS.md")
    info = machine_info()
    stamp = (
        f"`make bench-streaming` ({time.strftime('%Y-%m-%d')}): {info['cpu']}, "
        f"{info['cores']} cores, {info['memory']}; torch {info['torch']}."
    )
    body = "\n\n".join(section.markdown() for section in sections)
    put_section(
        Path(__file__).resolve().parent / "RESULTS.md", "bench-streaming", f"{body}\n\n{stamp}"
    )
    print(body)


if __name__ == "__main__":
    main()

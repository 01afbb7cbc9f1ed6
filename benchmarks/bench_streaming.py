"""Streaming data at scale: ``data.format: litdata`` against ``npy`` on a large image folder.

A synthetic set of 200,000 RGB 64x64 JPEGs in 10 class folders (per-class colour gradients
and shapes plus noise, so JPEG cannot squeeze them to nothing) is generated in a temporary
folder (the generation time is printed and counts towards no figure; nothing is committed).
Then, for each format:

* **prepare**: the real ``pipelines/prepare.py`` in a subprocess on that folder
  (``data.source: imagefolder``), as ``bench_prepare.py`` runs it: images/s over the whole
  stage (probe, split, decode, write) and the process's own peak RSS (``VmHWM``);
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
``N_train - world x batch`` of them in every epoch, and compares each rank's batches x batch
size with the manifest's count.

For scale, the CNN of params.yaml (the digits recipe's) is timed training at the same size
(3x64x64, batch 256, fp32 and bf16 autocast, the faster counts): it is far slower than the
data path, so a read rate above it never starves training.

Goal: litdata prepares within 2x of npy's images/s, with the same bounded peak memory
(< 1 GiB for both), and both formats read faster than the CNN trains, in one and two
processes.

Prepare runs once per format at 200,000 images (3 times up to 50,000: median); reads are
the median over the epochs of one run. A full run takes ~8-10 minutes on 2 cores.

Usage: python benchmarks/bench_streaming.py [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
from common import Section, fmt, median_spread, print_sections

IMAGES = 200_000
QUICK_IMAGES = 3_000
SIZE = 64  # pixels, square, RGB
CLASSES = 10
JPEG_QUALITY = 90
GEN_CHUNK = 2_000  # images per generation task
GLOBAL_BATCH = 256
WARMUP = 20  # batches of each epoch left out of its time
FORMATS = ("npy", "litdata")
PROCESSES = (1, 2)
GOAL_PREPARE_RATIO = 0.5  # litdata's prepare images/s over npy's
CNN_STEPS = 6  # timed CNN training steps (after 2 warm-up steps)
STRIDE = 37  # every STRIDE-th normalised value of an image goes into its fingerprint
_DDP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")

# ------------------------------------------------------------------ the synthetic image folder

# per class: gradient start, gradient end, shape colour
_PALETTE = np.random.default_rng(2024).uniform(20, 235, (CLASSES, 3, 3)).astype(np.float32)


def draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(B, SIZE, SIZE, 3)`` images: a class-coloured gradient, a shape, noise.

    Odd classes get a square, even ones a disc, at a random place and size; the gradient's
    direction is random. The noise (std 10) keeps JPEG files at a realistic few KB.
    """
    b = labels.size
    grid = np.arange(SIZE, dtype=np.float32) / (SIZE - 1) - 0.5
    yy, xx = grid[None, :, None], grid[None, None, :]
    angle = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
    t = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + 0.5, 0.0, 1.0)[..., None]
    start, end, shape = (_PALETTE[labels, k][:, None, None, :] for k in range(3))
    image = start + (end - start) * t
    cy, cx = (rng.uniform(-0.25, 0.25, (b, 1, 1)).astype(np.float32) for _ in range(2))
    radius = rng.uniform(0.1, 0.3, (b, 1, 1)).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    square = (labels % 2 == 1)[:, None, None]
    inside = np.where(
        square, np.maximum(abs(dx), abs(dy)) < radius, dx * dx + dy * dy < radius * radius
    )
    image = np.where(inside[..., None], shape, image)
    image += 10.0 * rng.standard_normal(image.shape, dtype=np.float32)
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
    disk: int = 0
    reads: dict[int, Read] = field(default_factory=dict)


def prepare(name: str, source: Path, images: int, work: Path, repeats: int) -> Format:
    """Run the prepare stage ``repeats`` times in ``format: name``; keep its last output."""
    work.mkdir(parents=True, exist_ok=True)
    case = Format(name, work / "prepared")
    for _ in range(repeats):
        params = base_params()
        params["data"].update(source="imagefolder", path=str(source), format=name)
        params["paths"]["prepared"] = str(case.prepared)
        seconds, peak = run_prepare(params, work)
        case.prepare_rates.append(images / seconds)
        case.rss.append(peak)
        print(f"  prepare {name}: {images / seconds:,.0f} images/s, {peak:,.0f} MiB", flush=True)
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


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``) in MiB."""
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:"))
    return int(peak.split()[1]) / 1024


def read_worker(prepared: Path, devices: int, num_workers: int, epochs: int, out: Path) -> None:
    """Train the probe for ``epochs`` epochs; each rank writes ``out.rank<r>.json/.npz``."""
    import lightning as L
    import torch

    from convpipe.data.datamodule import ConvDataModule
    from convpipe.hardware import cpu_threads

    warnings.filterwarnings("ignore")
    torch.set_num_threads(cpu_threads("auto", devices))
    datamodule = ConvDataModule(
        prepared, None, GLOBAL_BATCH, num_workers, False, 42,
        batch_transform="auto", resident=False,
    )  # fmt: skip
    model = _probe_module(WARMUP)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # as the train stage: the DataModule shards itself
        deterministic=True,
        default_root_dir=str(out.parent),
    )
    trainer.fit(model, datamodule=datamodule)
    rank = trainer.global_rank
    record = {
        "rank": rank,
        "world": trainer.world_size,
        "train_count": datamodule.manifest.splits["train"].count,
        "loader": type(trainer.train_dataloader).__name__,
        "epochs": model.epochs,
        "peak_rss_mib": peak_rss_mib(),
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
    loader: str


def _epoch_rate(ranks: list[dict[str, Any]], epoch: int) -> float:
    """Total images/s of ``epoch`` over the ranks (they step together under DDP)."""
    images = sum(r["epochs"][epoch]["timed_images"] for r in ranks)
    return images / max(r["epochs"][epoch]["seconds"] for r in ranks)


def read_run(prepared: Path, devices: int, epochs: int, num_workers: int = 0) -> Read:
    """Run :func:`read_worker` in a subprocess; gather every rank's figures."""
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-read-") as tmp:
        out = Path(tmp) / "read"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--read-worker"]
        cmd += ["--prepared", str(prepared), "--devices", str(devices)]
        cmd += ["--epochs", str(epochs), "--num-workers", str(num_workers), "--out", str(out)]
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
        once = seen == served
        enough = seen >= floor and slots >= floor and slots <= read.train_count + read.batch
        ok = ok and once and enough
        parts.append(
            f"epoch {e}: batches per rank {batches} x {read.batch} = {slots:,} slots, "
            f"{served:,} images served, {seen:,} distinct of {read.train_count:,} "
            f"(floor {floor:,}, {served - seen} repeats)"
        )
    return ok, "; ".join(parts)


# ---------------------------------------------------------------------- the CNN, for scale


def cnn_rate() -> tuple[float, str]:
    """Images/s params.yaml's CNN trains at on 3x64x64 batches of 256 (the faster precision)."""
    import torch
    import torch.nn.functional as F

    from convpipe.config.schema import parse_params
    from convpipe.hardware import cpu_threads
    from convpipe.models.network import build_cnn

    params = parse_params(base_params())
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads("auto", 1))
    best, best_name = 0.0, ""
    try:
        for name, bf16 in (("fp32", False), ("bf16-mixed", True)):
            torch.manual_seed(0)
            net = build_cnn(params.model, 3, (SIZE, SIZE), CLASSES).to(
                memory_format=torch.channels_last
            )
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
            x = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE).contiguous(
                memory_format=torch.channels_last
            )
            y = torch.randint(0, CLASSES, (GLOBAL_BATCH,))
            times = []
            for _ in range(2 + CNN_STEPS):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            rate = GLOBAL_BATCH / statistics.median(times[2:])
            print(f"  CNN ({name}): {rate:,.0f} images/s", flush=True)
            if rate > best:
                best, best_name = rate, name
    finally:
        torch.set_num_threads(before)
    return best, best_name


# ---------------------------------------------------------------------------------- report


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def table(cases: dict[str, Format], images: int) -> list[str]:
    """Markdown rows: one per format, then litdata/npy."""
    rows = [
        "| format | prepare images/s | peak RSS (MiB) | disk (MiB) | bytes/image "
        "| read images/s, 1 process | read images/s, 2 processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases.values():
        reads = " | ".join(fmt(case.reads[d].rates, 0) for d in PROCESSES)
        rows.append(
            f"| {case.name} | {fmt(case.prepare_rates, 0)} | {fmt(case.rss, 0)} "
            f"| {case.disk / 2**20:,.1f} | {case.disk / images:,.0f} | {reads} |"
        )
    lit, npy = cases["litdata"], cases["npy"]
    reads = " | ".join(_ratio(lit.reads[d].rates, npy.reads[d].rates) for d in PROCESSES)
    rows.append(
        f"| litdata / npy | {_ratio(lit.prepare_rates, npy.prepare_rates)} "
        f"| {_ratio(lit.rss, npy.rss)} | {lit.disk / npy.disk:.2f} "
        f"| {lit.disk / npy.disk:.2f} | {reads} |"
    )
    return rows


def verdict(cases: dict[str, Format], cnn: float) -> list[str]:
    """The goal's misses, in words (none: met)."""
    misses = []
    lit, npy = cases["litdata"], cases["npy"]
    ratio = statistics.median(lit.prepare_rates) / statistics.median(npy.prepare_rates)
    if ratio < GOAL_PREPARE_RATIO:
        misses.append(f"litdata prepares at {ratio:.2f}x npy's images/s (goal >= 0.5x)")
    for case in cases.values():
        peak = max(case.rss)
        if peak >= GOAL_RSS:
            misses.append(f"{case.name} prepare peaks at {peak:,.0f} MiB (goal < 1 GiB)")
        for d, read in case.reads.items():
            rate, _ = median_spread(read.rates)
            if rate <= cnn:
                misses.append(f"{case.name} reads {rate:,.0f} images/s on {d} process(es)")
    return misses


def notes(cases: dict[str, Format], ctx: dict[str, Any]) -> list[str]:
    """What was run, the generation time, the coverage checks and the read processes' RSS."""
    lit = cases["litdata"]
    read = lit.reads[2]
    rss = ", ".join(
        f"{c.name} {d} process(es) {r.peak_rss:,.0f}" for c in cases.values() for d, r in c.reads.items()
    )
    return [
        f"- Source: {ctx['images']:,} RGB {SIZE}x{SIZE} JPEGs (quality {JPEG_QUALITY}, "
        f"{ctx['source_mib']:,.0f} MiB) in {CLASSES} class folders, generated in "
        f"{ctx['generation']:.0f} s (not part of any figure); train split "
        f"{read.train_count:,} images.",
        f"- Prepare: a fresh `pipelines/prepare.py` process per run, {len(lit.prepare_rates)} "
        "run(s) per format (median); images/s over the whole stage (probe, split, decode, "
        "write), peak RSS its own `VmHWM`. Disk: the sum of the prepared folder's file sizes "
        f"(raw pixels are {SIZE * SIZE * 3:,} bytes/image).",
        f"- Reads: global batch {GLOBAL_BATCH}, runtime.num_workers 0, the normalising "
        f"transform in the loader; median over {len(read.rates)} epochs of one run, each timed "
        f"from its batch {ctx['warmup']} on; 2 processes: CPU DDP, total over both ranks, "
        f"{GLOBAL_BATCH // 2} images a rank and step. litdata's loader: {read.loader}. "
        f"Peak RSS of a read process (MiB): {rss}.",
        f"- litdata, 2 processes, every training image at most once and at least "
        f"N_train - 2 x {read.batch} times per epoch: **{'yes' if ctx['covered'] else 'NO'}** "
        f"({ctx['coverage']}).",
        f"- For scale: params.yaml's CNN trains at {ctx['cnn']:,.0f} images/s on 3x{SIZE}x{SIZE} "
        f"batches of {GLOBAL_BATCH} ({ctx['cnn_precision']}, best of fp32 and bf16-mixed); "
        f"the slowest read is {ctx['slowest'] / ctx['cnn']:,.0f}x that.",
    ]


def measure(images: int, quick: bool, work: Path) -> tuple[dict[str, Format], dict[str, Any]]:
    """Generate the set, prepare it in both formats, time the reads and the CNN."""
    source = work / "images"
    print(f"  generating {images:,} {SIZE}x{SIZE} JPEGs ...", flush=True)
    generation = make_images(source, images)
    ctx: dict[str, Any] = {"images": images, "generation": generation}
    ctx["source_mib"] = folder_bytes(source) / 2**20
    print(f"  wrote {images:,} images ({ctx['source_mib']:,.0f} MiB) in {generation:.1f} s")
    repeats = 1 if quick or images > 50_000 else 3
    cases = {name: prepare(name, source, images, work / name, repeats) for name in FORMATS}
    epochs = 2 if quick else 3
    for case in cases.values():
        for devices in PROCESSES:
            read = read_run(case.prepared, devices, epochs)
            case.reads[devices] = read
            print(
                f"  read {case.name}, {devices} process(es): {fmt(read.rates, 0, ' images/s')}",
                flush=True,
            )
    batches = min(cases["npy"].reads[1].batches[0])
    ctx["warmup"] = min(WARMUP, batches // 4)
    ctx["covered"], ctx["coverage"] = coverage(cases["litdata"].reads[2])
    print(f"  litdata DDP coverage ok: {ctx['covered']} ({ctx['coverage']})", flush=True)
    ctx["cnn"], ctx["cnn_precision"] = cnn_rate()
    ctx["slowest"] = min(median_spread(r.rates)[0] for c in cases.values() for r in c.reads.values())
    return cases, ctx


def run(quick: bool = False, images: int | None = None) -> list[Section]:
    """Measure both formats on a generated set of ``images`` JPEGs; one section."""
    count = images or (QUICK_IMAGES if quick else IMAGES)
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-streaming-") as tmp:
        cases, ctx = measure(count, quick, Path(tmp))
    if not ctx["covered"]:
        raise AssertionError(f"litdata under DDP did not cover the epoch: {ctx['coverage']}")
    misses = verdict(cases, ctx["cnn"])
    lit, npy = cases["litdata"], cases["npy"]
    body = [*table(cases, count), "", *notes(cases, ctx)]
    if misses:
        body.append(f"- Goal missed: {'; '.join(misses)}.")
    summary = (
        f"{count:,} 64x64 JPEGs: prepare litdata/npy {_ratio(lit.prepare_rates, npy.prepare_rates)}"
        f"x images/s, peak RSS {max(lit.rss):,.0f} / {max(npy.rss):,.0f} MiB, disk "
        f"{lit.disk / npy.disk:.2f}x; reads (1 / 2 processes) litdata "
        f"{statistics.median(lit.reads[1].rates):,.0f} / {statistics.median(lit.reads[2].rates):,.0f}, "
        f"npy {statistics.median(npy.reads[1].rates):,.0f} / "
        f"{statistics.median(npy.reads[2].rates):,.0f} images/s; CNN {ctx['cnn']:,.0f} images/s."
    )
    return [
        Section(
            title="Streaming data (litdata vs npy)",
            goal=(
                "litdata prepare >= 0.5x npy's images/s, peak RSS < 1 GiB for both, training "
                "reads faster than the CNN trains (1 and 2 processes)"
            ),
            met=not misses,
            summary=summary,
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
    args = parser.parse_args()
    if args.read_worker:
        read_worker(args.prepared, args.devices, args.num_workers, args.epochs, args.out)
        return
    print_sections(run(quick=args.quick, images=args.images))


if __name__ == "__main__":
    main()

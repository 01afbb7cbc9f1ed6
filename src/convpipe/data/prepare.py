"""The prepare stage: probe, split, normalise and write a dataset the loaders can read.

Pure pieces (:func:`stratified_split`, :func:`resolve_geometry`, :class:`ChannelStats`) take
arrays and values; :func:`write_prepared` is the one function that streams images to disk,
chunk by chunk, so memory stays bounded whatever the number of images. Each chunk is decoded
on every core the process may use (its CPU affinity: a SLURM or container allocation), and
written as ``data.format`` says: memory-mapped ``.npy`` arrays or LitData chunks.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convpipe.config.schema import DataParams, ResizeMode
from convpipe.data.images import channels_of, normalize
from convpipe.data.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    SkippedInfo,
    SplitInfo,
    class_counts,
    data_files,
    images_name,
)
from convpipe.data.raw import ALL, SPLITS, BadFileError, ImageInfo, RawDataset, RawSplit
from convpipe.data.streaming import ShardWriter
from convpipe.errors import ConvpipeError
from convpipe.io import atomic_dir, atomic_path, content_hash, create_npy

SKIPPED_REPORT = "skipped_files.csv"


def _carve(n: int, fraction: float) -> int:
    """Images of an ``n``-image class that go to a split of ``fraction`` (at least one)."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def stratified_split(
    labels: np.ndarray,
    fractions: dict[str, float],
    seed: int,
    class_names: Sequence[str],
    where: str = "in the data source",
) -> dict[str, np.ndarray]:
    """Split positions ``0..N-1`` class by class, seeded, keeping class proportions.

    Args:
        labels: ``(N,)`` integer class of each image.
        fractions: split name → fraction of each class carved out for it (e.g. val, test);
            whatever is left is ``train``.
        seed: makes the split reproducible.
        class_names: for error messages.
        where: the data the labels come from, for error messages (e.g. ``in data/cats``).

    Returns:
        split name → sorted ``(n_split,)`` positions; ``train`` always present.

    Raises:
        ConvpipeError: a class too small to give every split at least one image.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("train", *fractions)}
    for cls in range(len(class_names)):
        members = np.flatnonzero(labels == cls)
        if members.size == 0:
            continue
        takes = {name: _carve(members.size, frac) for name, frac in fractions.items()}
        if sum(takes.values()) >= members.size:
            needed = sum(takes.values()) + 1
            raise ConvpipeError(
                f"class '{class_names[cls]}' has {members.size} image(s), too few to stratify "
                f"into train/{'/'.join(fractions)} (needs at least {needed})",
                where,
                "add images to that class, remove it, or give the splits as folders",
            )
        members = rng.permutation(members)
        start = 0
        for name, take in takes.items():
            out[name].append(members[start : start + take])
            start += take
        out["train"].append(members[start:])
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items() if parts}


def resolve_geometry(
    infos: Iterable[ImageInfo], channels: int | str, size_hw: tuple[int, int] | None
) -> tuple[int, tuple[int, int]]:
    """Decide the output channels and ``(height, width)`` from the probed images and params.

    ``channels='auto'`` gives 3 if any image is in a colour mode, else 1. With no
    ``size_hw`` every image must already have the same size.

    Raises:
        ConvpipeError: mixed sizes with ``data.image_size: null``, or no images at all.
    """
    sizes: set[tuple[int, int]] = set()
    colour = False
    for info in infos:
        sizes.add((info.height, info.width))
        colour = colour or channels_of(info.mode) == 3
    if not sizes:
        raise ConvpipeError("no usable images found", "in the data source", "check data.path")
    out_channels = (3 if colour else 1) if channels == "auto" else int(channels)
    if size_hw is not None:
        return out_channels, size_hw
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
        raise ConvpipeError(
            f"images have {len(sizes)} different sizes ({shown}, ...) and data.image_size is null",
            "in params.yaml",
            "set data.image_size to e.g. 32 or [32, 32] to resize them all",
        )
    return out_channels, next(iter(sizes))


class ChannelStats:
    """Streaming per-channel mean and std of uint8 images scaled to ``[0, 1]``.

    Sums are exact integers (uint64), so the result does not depend on how the images are
    chunked, and a chunk is summed a slice at a time: float copies of a whole chunk of
    224-px photos would take GBs (a 2048-image chunk of 64-px ones took 384 MiB).
    """

    #: Images summed at once: bounds the temporary (uint32 pixels and their squares).
    SLICE = 64

    def __init__(self, channels: int) -> None:
        self._sum = np.zeros(channels, dtype=np.uint64)
        self._sumsq = np.zeros(channels, dtype=np.uint64)
        self._count = 0

    def update(self, chunk: np.ndarray) -> None:
        """Add a uint8 chunk ``(N, H, W, C)``."""
        for start in range(0, len(chunk), self.SLICE):
            flat = chunk[start : start + self.SLICE].reshape(-1, chunk.shape[-1])
            pixels = flat.astype(np.uint32)
            self._sum += pixels.sum(axis=0, dtype=np.uint64)
            self._sumsq += np.square(pixels).sum(axis=0, dtype=np.uint64)
            self._count += flat.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per channel; std is floored so normalising never divides by 0."""
        count = max(self._count, 1)
        mean = self._sum.astype(np.float64) / count / 255.0
        var = np.maximum(self._sumsq.astype(np.float64) / count / 255.0**2 - np.square(mean), 0.0)
        std = np.maximum(np.sqrt(var), 1e-6)
        return [float(v) for v in mean], [float(v) for v in std]


@dataclass
class _Plan:
    """Which source positions each output split takes, after probing and splitting."""

    splits: dict[str, tuple[RawSplit, np.ndarray]]
    skipped: list[BadFileError]
    channels: int
    size_hw: tuple[int, int]
    resize: ResizeMode


def _probe_all(
    raw: RawDataset, on_bad_file: str
) -> tuple[dict[str, np.ndarray], list[ImageInfo], list[BadFileError]]:
    """Probe every image; return usable positions per source split, their infos, the bad ones."""
    keep: dict[str, np.ndarray] = {}
    infos: list[ImageInfo] = []
    bad: list[BadFileError] = []
    total = sum(len(s.reader) for s in raw.splits.values())
    with tqdm(total=total, desc="probe", unit="img", disable=None, leave=False) as bar:
        for name, split in raw.splits.items():
            ok = []
            for i in range(len(split.reader)):
                try:
                    infos.append(split.reader.probe(i))
                    ok.append(i)
                except BadFileError as exc:
                    if on_bad_file == "error":
                        raise
                    bad.append(exc)
                bar.update(1)
            keep[name] = np.asarray(ok, dtype=np.int64)
    return keep, infos, bad


def _check_classes(labels: np.ndarray, class_names: Sequence[str], where: str) -> None:
    """Refuse data with fewer than two classes, or a class left without any usable image."""
    if len(class_names) < 2:
        raise ConvpipeError(
            f"found {len(class_names)} class ({', '.join(class_names) or 'none'}), a classifier "
            "needs at least 2",
            where,
            "add a folder per class",
        )
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[int(i)] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ConvpipeError(
            f"class '{empty[0]}' has no usable images", where, "add images or remove the class"
        )


def plan_splits(raw: RawDataset, params: DataParams, seed: int) -> _Plan:
    """Probe, drop bad files per ``data.on_bad_file``, and assign positions to splits."""
    keep, infos, bad = _probe_all(raw, params.on_bad_file)
    channels, size_hw = resolve_geometry(infos, params.channels, params.size_hw())
    where = f"in {params.path or raw.source}"
    fractions = {"val": params.val_fraction, "test": params.test_fraction}
    if ALL in raw.splits:
        pool = raw.splits[ALL]
        labels = pool.labels[keep[ALL]]
        _check_classes(labels, raw.class_names, where)
        parts = stratified_split(labels, fractions, seed, raw.class_names, where)
        splits = {name: (pool, keep[ALL][pos]) for name, pos in parts.items()}
    else:
        train = raw.splits["train"]
        labels = train.labels[keep["train"]]
        _check_classes(labels, raw.class_names, where)
        missing = {k: v for k, v in fractions.items() if k not in raw.splits}
        parts = stratified_split(labels, missing, seed, raw.class_names, where)
        splits = {name: (train, keep["train"][pos]) for name, pos in parts.items()}
        splits.update({k: (raw.splits[k], keep[k]) for k in raw.splits if k != "train"})
    for name in SPLITS:
        if name not in splits or splits[name][1].size == 0:
            raise ConvpipeError(
                f"the {name} split is empty",
                where,
                f"set data.{name}_fraction > 0 or provide a {name}/ folder",
            )
    return _Plan(splits, [*raw.skipped, *bad], channels, size_hw, params.resize)


#: Fewer images than this decode in prepare's own process: starting workers costs more.
PARALLEL_FROM = 4096
#: The plan forked decode workers read: inherited when the pool forks, never pickled.
_FORKED: _Plan | None = None
#: A decoded piece: uint8 images ``(n, H, W, C)`` and each failure's ``(row, file, reason)``.
Decoded = tuple[np.ndarray, list[tuple[int, str, str]]]


def _decode_piece(plan: _Plan, name: str, positions: list[int]) -> Decoded:
    """Decode ``positions`` of split ``name``; a file that fails is a zero image and a record."""
    split = plan.splits[name][0]
    h, w = plan.size_hw
    images = np.zeros((len(positions), h, w, plan.channels), dtype=np.uint8)
    failed = []
    for row, position in enumerate(positions):
        try:
            images[row] = _decode(split, position, plan)
        except BadFileError as exc:
            failed.append((row, exc.path, exc.reason))
    return images, failed


def _forked_piece(name: str, positions: list[int]) -> Decoded:
    assert _FORKED is not None  # set before the pool forked
    return _decode_piece(_FORKED, name, positions)


def _ignore_interrupts() -> None:
    # Ctrl+C reaches the whole process group: prepare itself stops, its workers stay quiet
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Decoder:
    """Decodes a chunk of a split on every core this process may use, in order.

    The workers are forked, so they share the plan and the source readers (files are opened
    per image, arrays are in memory or memory-mapped) without pickling them; each returns
    its share of the chunk. The same bytes come out whatever the number of cores.
    """

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.workers = 1
        self._pool: Any = None

    def __enter__(self) -> _Decoder:
        global _FORKED
        images = sum(positions.size for _, positions in self.plan.splits.values())
        self.workers = len(os.sched_getaffinity(0)) if images >= PARALLEL_FROM else 1
        if self.workers > 1:
            _FORKED = self.plan
            context = multiprocessing.get_context("fork")
            self._pool = context.Pool(self.workers, initializer=_ignore_interrupts)
        return self

    def __exit__(self, *exc: object) -> None:
        global _FORKED
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        _FORKED = None

    def __call__(self, name: str, positions: np.ndarray) -> list[Decoded]:
        """The pieces of ``positions`` decoded, in order."""
        if self._pool is None:
            return [_decode_piece(self.plan, name, positions.tolist())]
        pieces = [p.tolist() for p in np.array_split(positions, self.workers) if p.size]
        return list(self._pool.starmap(_forked_piece, [(name, p) for p in pieces]))


def _decoded_chunks(
    name: str,
    decode: _Decoder,
    chunk: int,
    skipped: list[BadFileError] | None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Decode split ``name`` ``chunk`` images at a time, in its order.

    Args:
        name: the split to decode (``train``, ``val`` or ``test``).
        decode: decodes a chunk's positions (on every core given).
        chunk: images decoded per chunk: the most held in memory at once.
        skipped: where to record undecodable files; None makes the first one fatal.

    Yields:
        ``(start, images, kept)``: the chunk's first position in the split, uint8
        ``(n, H, W, C)`` images and ``(n,)`` whether each decoded (a skipped one is zeros).
    """
    positions = decode.plan.splits[name][1]
    with tqdm(total=positions.size, desc=name, unit="img", disable=None, leave=False) as bar:
        for start in range(0, positions.size, chunk):
            pieces = decode(name, positions[start : start + chunk])
            images = np.concatenate([piece for piece, _ in pieces])
            kept = np.ones(len(images), dtype=bool)
            offset = 0
            for piece, failed in pieces:
                for row, path, reason in failed:
                    if skipped is None:
                        raise BadFileError(path, reason)
                    skipped.append(BadFileError(path, reason))
                    kept[offset + row] = False
                offset += len(piece)
            bar.update(len(images))
            yield start, images, kept


def _write_npy_split(
    out_dir: Path, name: str, decode: _Decoder, chunk: int, skipped: list[BadFileError] | None
) -> tuple[np.ndarray, ChannelStats]:
    """Decode split ``name`` into ``out_dir/<name>_x.npy``.

    Returns:
        The ``(n_kept,)`` labels of the images written, and their channel statistics.
    """
    plan = decode.plan
    split, positions = plan.splits[name]
    h, w = plan.size_hw
    stats = ChannelStats(plan.channels)
    x = create_npy(
        out_dir / f"{name}_x.npy",
        dtype=np.uint8,
        shape=(positions.size, h, w, plan.channels),
    )
    kept = np.ones(positions.size, dtype=bool)
    for start, images, ok in _decoded_chunks(name, decode, chunk, skipped):
        x[start : start + len(images)] = images
        kept[start : start + len(images)] = ok
        stats.update(images[ok])
    x.flush()
    del x
    if not kept.all():
        _compact(out_dir / f"{name}_x.npy", kept)
    return split.labels[positions[kept]], stats


def _write_litdata_split(
    out_dir: Path, name: str, decode: _Decoder, chunk: int, skipped: list[BadFileError] | None
) -> tuple[np.ndarray, ChannelStats]:
    """Decode split ``name`` into the LitData folder ``out_dir/<name>/``.

    Returns:
        The ``(n_kept,)`` labels of the images written, in their order, and their statistics.
    """
    split, positions = decode.plan.splits[name]
    stats = ChannelStats(decode.plan.channels)
    writer = ShardWriter(out_dir / name)
    labels = []
    for start, images, ok in _decoded_chunks(name, decode, chunk, skipped):
        chunk_labels = split.labels[positions[start : start + len(images)]][ok]
        writer.write(images[ok], chunk_labels)
        stats.update(images[ok])
        labels.append(chunk_labels)
    writer.close()
    return np.concatenate(labels), stats


def _decode(split: RawSplit, position: int, plan: _Plan) -> np.ndarray:
    """Load and normalise one image to ``(H, W, C)`` uint8; any failure names the file."""
    image = split.reader.load(position)
    try:
        return normalize(image, plan.channels, plan.size_hw, plan.resize)
    except ValueError as exc:  # a mode Pillow decodes but convpipe cannot convert
        raise BadFileError(split.reader.name(position), str(exc)) from None


def _compact(path: Path, kept: np.ndarray) -> None:
    """Rewrite an ``.npy`` file keeping only the rows where ``kept`` is true."""
    src = np.load(path, mmap_mode="r")
    with atomic_path(path) as tmp:
        dst = create_npy(tmp, dtype=src.dtype, shape=(int(kept.sum()), *src.shape[1:]))
        rows = np.flatnonzero(kept)
        for start in range(0, rows.size, 4096):
            sel = rows[start : start + 4096]
            dst[start : start + sel.size] = src[sel]
        dst.flush()
        del dst
    del src


def _skipped_report(skipped: Sequence[BadFileError]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "reason"])
    writer.writerows([exc.path, exc.reason] for exc in skipped)
    return buf.getvalue()


_WRITERS = {"npy": _write_npy_split, "litdata": _write_litdata_split}


def _shuffle_train(plan: _Plan, seed: int) -> None:
    """Store the train split in a seeded random order (the ``litdata`` format).

    LitData shuffles chunks, then images inside a chunk: images that sit together in the
    files (one class after another, as folders list them) would stay together in batches.
    """
    split, positions = plan.splits["train"]
    plan.splits["train"] = (split, np.random.default_rng(seed).permutation(positions))


def write_prepared(raw: RawDataset, params: DataParams, seed: int, out_dir: str | Path) -> Manifest:
    """Probe, split, normalise and write ``raw`` into ``out_dir`` (replaced atomically).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    plan = plan_splits(raw, params, seed)
    if params.format == "litdata":
        _shuffle_train(plan, seed)
    skipped = plan.skipped if params.on_bad_file == "skip" else None
    splits: dict[str, SplitInfo] = {}
    stats = ChannelStats(plan.channels)
    write_split = _WRITERS[params.format]
    with atomic_dir(out_dir) as tmp, _Decoder(plan) as decode:
        for name in SPLITS:
            labels, split_stats = write_split(tmp, name, decode, params.chunk_size, skipped)
            np.save(tmp / f"{name}_y.npy", labels.astype(np.int64), allow_pickle=False)
            if name == "train":
                # files skipped while decoding may have emptied a class
                _check_classes(labels, raw.class_names, "in the train split")
                stats = split_stats
            splits[name] = SplitInfo(
                count=int(labels.size),
                per_class=class_counts(labels, raw.class_names),
                x=images_name(name, params.format),
                y=f"{name}_y.npy",
            )
        (tmp / SKIPPED_REPORT).write_text(_skipped_report(plan.skipped), encoding="utf-8")
        mean, std = stats.result()
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            stage="prepare",
            source=raw.source,
            class_names=list(raw.class_names),
            num_classes=len(raw.class_names),
            channels=plan.channels,
            image_size=plan.size_hw,
            resize=plan.resize,
            format=params.format,
            mean=mean,
            std=std,
            splits=splits,
            skipped=SkippedInfo(count=len(plan.skipped), report=SKIPPED_REPORT),
            content_hash=content_hash(data_files(tmp, splits)),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest

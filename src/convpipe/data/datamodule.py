"""The LightningDataModule over the prepared (and augmented) memory-mapped arrays.

Batches are fetched whole (:mod:`convpipe.data.datasets`), sampled per process and resumable
mid-epoch (:mod:`convpipe.data.sampling`), then normalised with the manifest's mean/std (and
augmented online if ``augment.online``) by the transform from
:mod:`convpipe.data.transforms.normalize`.

Where that transform runs is ``runtime.batch_transform``: in the DataLoader (``loader``, on the
host, what a CPU wants: workers overlap it with training) or after the batch's copy to the
model's device (``device``: batches cross the bus as uint8, a quarter of float32's bytes, and a
GPU does the per-pixel work); ``auto`` is ``device`` exactly when the model is not on the CPU.
``runtime.resident`` goes further: the uint8 arrays are copied to the device once and the
loader hands out only indices, in the sampler's order. Every placement gives the same batches
with ``runtime.num_workers: 0`` (DataLoader workers each draw their own augmentation stream).

In ``data.format: litdata`` the training images stream through LitData's
``StreamingDataLoader`` (:mod:`convpipe.data.streaming`): LitData shards and shuffles them
(another order than the ``npy`` sampler's, from the same seed) and its loader state resumes
an epoch part-way; validation and test read the splits by index, in order, as ``npy`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeAlias

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
)

from convpipe.data.datasets import ArrayDataset, Batch, ConcatBatches, IndexDataset
from convpipe.data.manifest import PIPELINE_FILE, Manifest, load_manifest, load_split
from convpipe.data.sampling import ResumableSampler, ShardSampler, TrainLoader, collate_batch
from convpipe.data.streaming import StreamedImages
from convpipe.data.transforms.factory import load_augmentation
from convpipe.data.transforms.normalize import BatchTransform
from convpipe.errors import ConvpipeError

#: Images per forward pass wherever a model is only run, not trained: validation here, and
#: evaluate, predict, export's parity check and the served model (:mod:`convpipe.inference`).
#: Memory-bounded at 224 px on a laptop; the logits do not depend on it.
EVAL_BATCH_SIZE = 256
#: ``runtime.batch_transform``: where batches are normalised and augmented.
Placement: TypeAlias = Literal["auto", "loader", "device"]


def check_compatible(prepared: Manifest, augmented: Manifest, where: str | Path) -> None:
    """Refuse augmented copies made from data of another shape or class list.

    Raises:
        ConvpipeError: naming the first field that differs.
    """
    if "train" not in augmented.splits:
        raise ConvpipeError(
            "the augmented data has no train split", f"in {where}", "rerun `dvc repro augment`"
        )
    for field in ("class_names", "channels", "image_size"):
        mine, theirs = getattr(prepared, field), getattr(augmented, field)
        if mine != theirs:
            raise ConvpipeError(
                f"the augmented data has {field} {theirs}, the prepared data {mine}",
                f"in {where}",
                "rerun `dvc repro augment` after prepare",
            )


class ConvDataModule(L.LightningDataModule):
    """Train = prepared train split + augmented copies; val and test = prepared splits.

    Args:
        prepared_dir: the prepare stage's output folder.
        augmented_dir: the augment stage's output folder, or None to train without it.
        batch_size: images per batch, or ``"full"`` for batch gradient descent.
        num_workers: DataLoader worker processes.
        online: augment every training batch with the augment stage's saved pipeline.
        seed: seeds the online augmentation stream.
        batch_transform: ``runtime.batch_transform``: where batches are normalised and
            augmented (``loader``, ``device`` or ``auto``: see the module docstring).
        resident: ``runtime.resident``: keep the uint8 splits on the model's device.
        stream_from: ``runtime.stream_from``: an object-store URL holding a copy of the data
            folders, read instead of the local ones (``data.format: litdata`` only).

    Attributes:
        on_device: whether batches are transformed on the model's device (resolved by
            :meth:`setup`, when the Trainer's device is known).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        augmented_dir: str | Path | None,
        batch_size: int | str,
        num_workers: int,
        online: bool,
        seed: int,
        *,
        batch_transform: Placement,
        resident: bool,
        stream_from: str | None = None,
    ) -> None:
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.augmented_dir = Path(augmented_dir) if augmented_dir is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.online = online
        self.seed = seed
        self.batch_transform = batch_transform
        self.resident = resident
        self.stream_from = stream_from.rstrip("/") if stream_from else None
        self.on_device = False
        self._device_transforms: dict[str, BatchTransform] = {}
        self._host_arrays: dict[str, list[np.ndarray]] = {}
        self._resident_arrays: dict[str, torch.Tensor] = {}
        self.manifest: Manifest = load_manifest(self.prepared_dir)
        self.augmented: Manifest | None = None
        if self.augmented_dir is not None:
            self.augmented = load_manifest(self.augmented_dir)
            check_compatible(self.manifest, self.augmented, self.augmented_dir)
        self._check_streaming()
        self.datasets: dict[str, Dataset[Batch]] = {}
        self._stream: Any = None

    @property
    def streaming(self) -> bool:
        """Whether the data is in LitData's format (``data.format: litdata``)."""
        return self.manifest.format == "litdata"

    def _check_streaming(self) -> None:
        """Refuse options the stored format cannot serve, naming the one to change."""
        if not self.streaming:
            if self.stream_from:
                raise ConvpipeError(
                    f"runtime.stream_from is set, but {self.prepared_dir} holds data.format npy",
                    "in params.yaml",
                    "set data.format: litdata and rerun `dvc repro prepare`, or empty "
                    "runtime.stream_from",
                )
            return
        if self.resident:
            raise ConvpipeError(
                "runtime.resident keeps whole splits on the device; data.format litdata streams "
                "them",
                "in params.yaml",
                "set runtime.resident: false, or data.format: npy",
            )
        if self.augmented is not None and self.augmented.format != "litdata":
            raise ConvpipeError(
                "the augmented copies are npy, the prepared data litdata",
                f"in {self.augmented_dir}",
                "rerun `dvc repro augment`",
            )

    def location(self, folder: Path, manifest: Manifest, split: str) -> str:
        """Where a LitData split is read from: its local folder, or its copy under the URL.

        Under ``runtime.stream_from`` the split's path is the same below the URL as the
        folder's below the project: ``s3://bucket/convpipe/data/prepared/train``.
        """
        local = folder / manifest.splits[split].x
        if not self.stream_from:
            return str(local)
        return f"{self.stream_from}/{local.as_posix().lstrip('/')}"

    @property
    def train_size(self) -> int:
        """M in the course's λ/m: the number of training images, copies included."""
        size = self.manifest.splits["train"].count
        if self.augmented is not None:
            size += self.augmented.splits["train"].count
        return size

    def train_class_counts(self) -> list[int]:
        """Training images per class in label order, augmented copies included (manifests)."""
        counts = [
            self.manifest.splits["train"].per_class[name] for name in self.manifest.class_names
        ]
        if self.augmented is not None:
            extra = self.augmented.splits["train"].per_class
            counts = [
                c + extra.get(name, 0)
                for c, name in zip(counts, self.manifest.class_names, strict=True)
            ]
        return counts

    def transform(self, train: bool) -> BatchTransform:
        """The batch transform for the training side (``train``) or for evaluation."""
        augmentation = None
        if train and self.online and self.augmented_dir is not None:
            augmentation = load_augmentation(self.augmented_dir / PIPELINE_FILE, self.seed)
        return BatchTransform(augmentation, self.manifest.mean, self.manifest.std, self.seed)

    def split(self, name: str) -> ArrayDataset:
        """One prepared split as a dataset with the evaluation transform."""
        x, y = self._load(self.prepared_dir, self.manifest, name)
        return ArrayDataset(x, y, self.transform(train=False))

    def _load(self, folder: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's images and labels: local, or streamed from ``runtime.stream_from``."""
        x, y = load_split(folder, manifest, split)
        if self.stream_from and isinstance(x, StreamedImages):
            x = StreamedImages(self.location(folder, manifest, split), x.shape)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the splits (cheap: nothing is read until a batch is fetched)."""
        if self.datasets:
            return
        self.on_device = self._transform_on_device()
        transforms = {"train": self.transform(train=True), "val": self.transform(train=False)}
        transforms["test"] = transforms["val"]
        if self.on_device:
            self._device_transforms = transforms
        sources = [(self.prepared_dir, self.manifest)]
        aug = self.augmented
        if self.augmented_dir is not None and aug is not None and aug.splits["train"].count:
            sources.append((self.augmented_dir, aug))
        if self.streaming:
            from convpipe.data.stream_loader import streaming_dataset

            locations = [self.location(folder, manifest, "train") for folder, manifest in sources]
            self._stream = streaming_dataset(locations, self.seed)
        splits = {
            "train": [self._load(folder, manifest, "train") for folder, manifest in sources],
            "val": [self._load(self.prepared_dir, self.manifest, "val")],
            "test": [self._load(self.prepared_dir, self.manifest, "test")],
        }
        for name, parts in splits.items():
            self.datasets[name] = self._dataset(parts, None if self.on_device else transforms[name])
            if self.resident:
                self._host_arrays[name] = [x for x, _ in parts]

    def _dataset(
        self, parts: list[tuple[np.ndarray, np.ndarray]], transform: BatchTransform | None
    ) -> Dataset[Batch]:
        if self.resident:
            return IndexDataset(np.concatenate([y for _, y in parts]))
        if len(parts) == 1:
            return ArrayDataset(*parts[0], transform)
        return ConcatBatches([ArrayDataset(x, y, None) for x, y in parts], transform)

    def _transform_on_device(self) -> bool:
        if self.resident or self.batch_transform == "device":
            return True
        if self.batch_transform == "loader" or self.trainer is None:
            return False
        return self.trainer.strategy.root_device.type != "cpu"

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """On the model's device: gather resident images, then augment and normalise.

        Args:
            batch: uint8 images ``(B, H, W, C)`` (or, resident, int64 indices ``(B,)``) and
                int64 labels ``(B,)``, already on the device.
            dataloader_idx: unused (one loader per split).

        Returns:
            float ``(B, C, H, W)`` images and the labels; the batch as given when the
            DataLoader already transformed it.
        """
        if not self.on_device:
            return batch
        split = self._current_split()
        images, labels = batch
        if self.resident:
            images = self._resident(split, images.device)[images]
        return self._device_transforms[split](images), labels

    def _current_split(self) -> str:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return "train"
        if trainer is not None and trainer.testing:
            return "test"
        return "val"

    def _resident(self, split: str, device: torch.device) -> torch.Tensor:
        """The split's uint8 images ``(N, H, W, C)`` on ``device``, copied there once."""
        array = self._resident_arrays.get(split)
        if array is None or array.device != device:
            host = np.concatenate([np.asarray(x) for x in self._host_arrays[split]])
            array = torch.from_numpy(host).to(device)
            self._resident_arrays[split] = array
        return array

    def world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached Trainer (``(1, 0)`` without one)."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def device_batch_size(self, size: int) -> int:
        """Images per process and step: ``train.batch_size`` is the *global* batch.

        Under DDP each of the W processes takes ``batch_size / W`` images, so the gradient
        (averaged by DDP) is that of one global batch: the same optimisation, learning rate and
        λ/m as on one device, with no learning-rate scaling rule needed.

        Raises:
            ConvpipeError: if the global batch does not split evenly over the processes.
        """
        world, _ = self.world()
        if self.batch_size == "full":
            return -(-size // world)
        batch = min(int(self.batch_size), size)
        if batch < world or batch % world:
            raise ConvpipeError(
                f"train.batch_size {self.batch_size} (the global batch) cannot be split evenly "
                f"over {world} processes",
                "in params.yaml",
                f"use a multiple of {world} (devices x num_nodes), or batch_size: full",
            )
        return batch // world

    def _loader_options(self) -> dict[str, Any]:
        cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "collate_fn": collate_batch,
            "persistent_workers": self.num_workers > 0,
            # page-locked host batches copy to a GPU asynchronously
            "pin_memory": cuda,
        }

    def _completed_batches(self) -> int:
        """Batches of the current epoch the attached Trainer's fit loop has trained on."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled training batches, seeded per epoch; sharded over the ranks under DDP."""
        if self._stream is not None:
            return self._stream_loader()
        dataset = self.datasets["train"]
        size = len(dataset)  # type: ignore[arg-type]
        world, rank = self.world()
        # The shuffle is a function of (seed, epoch) only (Lightning calls set_epoch), so a
        # training resumed at epoch k, or part-way through it, sees the batches of one that
        # never stopped.
        sampler = ResumableSampler(dataset, world, rank, self.seed)
        batch = self.device_batch_size(size)
        return TrainLoader(
            dataset, sampler, batch, self._completed_batches, **self._loader_options()
        )

    def _stream_loader(self) -> DataLoader[Batch]:
        """LitData's loader over the streamed training images (its state resumes an epoch)."""
        from convpipe.data.stream_loader import StreamCollate, StreamLoader

        transform = None if self.on_device else self.transform(train=True)
        options = self._loader_options()
        options.pop("persistent_workers")  # LitData restarts its workers' streams every epoch
        options["collate_fn"] = StreamCollate(transform)
        batch = self.device_batch_size(self.train_size)
        return StreamLoader(self._stream, self._epoch, batch_size=batch, **options)

    def _epoch(self) -> int | None:
        """The attached Trainer's 0-based current epoch (None without a Trainer)."""
        return None if self.trainer is None else int(self.trainer.current_epoch)

    def _eval_loader(self, name: str) -> DataLoader[Batch]:
        size = len(self.datasets[name])  # type: ignore[arg-type]
        world, rank = self.world()
        # results do not depend on the evaluation batch size; only memory and speed do
        return DataLoader(
            self.datasets[name],
            batch_size=EVAL_BATCH_SIZE,
            sampler=ShardSampler(size, world, rank),
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader[Batch]:
        """Validation batches in order, each image on exactly one rank."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader[Batch]:
        """Test batches in order, each image on exactly one rank."""
        return self._eval_loader("test")

"""The model and data path on a CUDA GPU: ``make gpu-check``'s unit tier.

Every test here needs CUDA and skips without it (this CPU machine included): the CPU side of
the same behaviour is tested in test_datamodule.py and test_transforms.py. The data is
synthetic (no scikit-learn on the GPU machines) and prepared by convpipe's own prepare stage.
``CONVPIPE_TEST_DEVICE=cpu`` runs them against the CPU instead, to check the tests themselves
where no GPU is.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convpipe.config.edit import set_dotted
from convpipe.config.schema import Params, parse_params
from convpipe.data.augment import write_augmented
from convpipe.data.datamodule import ConvDataModule
from convpipe.data.prepare import write_prepared
from convpipe.data.raw import ALL
from convpipe.data.readers.base import ArrayReader, labelled
from convpipe.data.transforms.batched import tensor_augmentation
from convpipe.data.transforms.factory import build_augmentation
from convpipe.inference.predict import predict_logits
from convpipe.training.run import build_model
from tests.helpers.models import quiet_trainer

DEVICE = os.environ.get("CONVPIPE_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else DEVICE

pytestmark = [
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

#: Bilinear resampling and float rounding differ between the CPU's and the GPU's kernels.
PIXEL_ATOL = 1e-2


@pytest.fixture(scope="module")
def rgb(raw_params: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Prepared synthetic 16x16 RGB images and the online crop/flip/jitter/noise pipeline."""
    root = tmp_path_factory.mktemp("gpu")
    raw = copy.deepcopy(raw_params)
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    for key, value in {
        "augment.online": True,
        "augment.copies": 0,
        "augment.crop.p": 1.0,
        "augment.horizontal_flip.p": 0.5,
        "augment.color_jitter.p": 0.5,
        "augment.gaussian_noise.p": 0.5,
        "train.batch_size": 32,
        "train.accelerator": ACCELERATOR,
    }.items():
        set_dotted(raw, key, value)
    params = parse_params(raw)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(400) % 4
    source = labelled("synthetic", list("abcd"), {ALL: (labels, ArrayReader(images, "gpu"))})
    write_prepared(source, params.data, params.base.seed, params.paths.prepared)
    write_augmented(params)
    return params


def test_batched_augmentation_draws_the_same_images_on_the_gpu(rgb: Params) -> None:
    pipeline = build_augmentation(rgb.augment, (16, 16), 3, 7)
    images = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8)
    on_cpu = tensor_augmentation(pipeline, 7)
    on_gpu = tensor_augmentation(pipeline, 7)
    assert on_cpu is not None and on_gpu is not None
    expected = on_cpu(images)
    got = on_gpu(images.to(DEVICE))
    assert got.device.type == DEVICE
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=PIXEL_ATOL)


def _first_batches(params: Params, placement: str, accelerator: str) -> list[torch.Tensor]:
    runtime = params.runtime.model_copy(
        update={"batch_transform": placement, "resident": placement == "device"}
    )
    params = params.model_copy(update={"runtime": runtime})
    torch.manual_seed(0)
    datamodule, model = build_model(params)
    seen: list[torch.Tensor] = []
    step = model.training_step

    def record(batch: Any, batch_idx: int) -> Any:
        seen.append(batch[0].detach().float().cpu())
        return step(batch, batch_idx)

    model.training_step = record  # type: ignore[method-assign]
    trainer = quiet_trainer(
        params.paths.checkpoints, accelerator=accelerator, max_steps=3, limit_val_batches=0
    )
    trainer.fit(model, datamodule=datamodule)
    assert isinstance(datamodule, ConvDataModule)
    assert datamodule.on_device == (placement == "device")
    return seen


def test_resident_device_path_on_the_gpu_feeds_the_cpu_loaders_batches(rgb: Params) -> None:
    on_cpu = _first_batches(rgb, "loader", "cpu")
    on_gpu = _first_batches(rgb, "device", ACCELERATOR)
    assert len(on_cpu) == len(on_gpu) == 3
    for cpu_batch, gpu_batch in zip(on_cpu, on_gpu, strict=True):
        # normalised pixels: a 1e-2 pixel difference is ~1e-4 of a unit of std
        torch.testing.assert_close(gpu_batch, cpu_batch, rtol=0, atol=1e-3)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_training_on_the_gpu_is_finite_and_evaluates_like_the_cpu(
    rgb: Params, precision: str
) -> None:
    if DEVICE == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    datamodule, model = build_model(rgb)
    trainer = quiet_trainer(
        rgb.paths.checkpoints,
        accelerator=ACCELERATOR,
        precision=precision,
        max_steps=10,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    test = datamodule.split("test")
    with torch.no_grad():
        on_gpu = predict_logits(model.to(DEVICE), test, 64, "none")
        on_cpu = predict_logits(model.cpu(), test, 64, "none")
    assert on_gpu.device.type == "cpu"  # predict_logits hands logits back on the host
    # TF32 convolutions (cuDNN's default) round to ~1e-3 of each value
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-2, atol=1e-2)


def test_pinned_memory_when_training_on_a_gpu(rgb: Params, tmp_path: Path) -> None:
    datamodule, model = build_model(rgb)
    trainer = quiet_trainer(tmp_path, accelerator=ACCELERATOR, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert datamodule.train_dataloader().pin_memory == (DEVICE == "cuda")

"""Tiny models, loaders and Trainers shared by the model and training-technique tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from convpipe.config.schema import ModelParams, Params, TrainParams
from convpipe.models.module import CNNClassifier

HW = (8, 8)

#: Warnings tiny Trainer runs raise that say nothing about convpipe: few batches, and
#: Lightning 2.6 still using torch.utils._pytree.LeafSpec, deprecated in torch 2.13.
QUIET_LIGHTNING = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


def block(params: Params, **update: Any) -> dict[str, Any]:
    return {**params.model.conv[0].model_dump(), **update}


def model_variant(params: Params, **update: Any) -> ModelParams:
    return ModelParams.model_validate({**params.model.model_dump(), **update})


def train_variant(params: Params, **update: Any) -> TrainParams:
    return TrainParams.model_validate({**params.train.model_dump(), **update})


def tiny_model(params: Params, **update: Any) -> ModelParams:
    """One 4-filter conv block and an 8-unit hidden layer: fast enough for Trainer tests."""
    conv = [block(params, filters=4, kernel=3, stride=1, padding="same", pool="max", pool_size=2)]
    return model_variant(params, **{"conv": conv, "hidden": [8], "dropout": 0.1, **update})


def classifier(
    params: Params,
    num_classes: int = 3,
    channels: int = 1,
    model: ModelParams | None = None,
    runtime: dict[str, Any] | None = None,
    **train_update: Any,
) -> CNNClassifier:
    """A tiny classifier; with ``runtime`` (overrides of the shipped section) it runs so."""
    module = CNNClassifier(
        model=(model or tiny_model(params)).model_dump(),
        train=train_variant(params, **train_update).model_dump(),
        in_channels=channels,
        image_hw=HW,
        num_classes=num_classes,
        train_size=32,
    )
    if runtime is not None:
        module.use_runtime(params.runtime.model_copy(update=runtime))
    return module


def loader(num_classes: int = 3, n: int = 16, channels: int = 1, nan: bool = False) -> DataLoader:
    x = torch.randn(n, channels, *HW)
    if nan:
        x[0, 0, 0, 0] = float("nan")
    y = torch.randint(0, num_classes, (n,))
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_steps": 3,
    }
    return L.Trainer(**{**options, **kwargs})

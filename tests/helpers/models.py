"""Tiny networks, classifiers, loaders and Trainers: the one set every test builds models from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from convpipe.config.schema import ModelParams, Params, TrainParams, read_yaml
from convpipe.models.module import CNNClassifier
from tests.helpers.project import ROOT

#: One small conv block (4 filters, same padding, batch norm, 2x2 max pooling): fast tests.
TINY_CONV = [
    {
        "filters": 4,
        "kernel": 3,
        "stride": 1,
        "padding": "same",
        "activation": "relu",
        "batch_norm": True,
        "pool": "max",
        "pool_size": 2,
    }
]


def model_section(
    conv: list[dict[str, Any]], hidden: list[int], dropout: float, **more: Any
) -> dict[str, Any]:
    """The shipped ``model:`` section with another network: its other keys stay as shipped."""
    return {
        **read_yaml(ROOT / "params.yaml")["model"],
        "conv": conv,
        "hidden": hidden,
        "dropout": dropout,
        **more,
    }


def residual_stage(filters: int, blocks: int = 1, stride: int = 2, **more: Any) -> dict[str, Any]:
    """One ``model.stages`` entry: basic blocks with ReLU unless ``more`` says otherwise."""
    stage = {"block": "basic", "filters": filters, "blocks": blocks, "stride": stride}
    return {**stage, "activation": "relu", **more}


#: A tiny residual network: TINY_CONV's stem, two basic stages (the second downsamples with a
#: projection shortcut), global average pooling: fast tests of everything a ResNet goes through.
TINY_RESIDUAL = model_section(
    TINY_CONV,
    [],
    0.0,
    stages=[residual_stage(4, stride=1), residual_stage(8, stride=2)],
    global_pool="avg",
)


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


def fp32(train: Any) -> Any:
    """A ``train`` section with ``precision: 32-true``: what build_trainer takes resolved."""
    return train.model_copy(update={"precision": "32-true"})


def quiet_trainer(root: str | Path, **options: Any) -> L.Trainer:
    """A Trainer for making test checkpoints: no logger, checkpointing, progress bar or summary."""
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **options,
    )


def fit_and_save(
    module: L.LightningModule, data: DataLoader, root: str | Path, path: str | Path, **options: Any
) -> None:
    """Fit ``module`` on ``data`` with a :func:`quiet_trainer` and save a real checkpoint.

    ``options`` are Trainer arguments (``max_steps=1``, ``max_epochs=5``).
    """
    trainer = quiet_trainer(root, **options)
    trainer.fit(module, data)
    trainer.save_checkpoint(path)

"""Factories for what many tests set up: a params file in a folder, prepared data, a checkpoint.

The usual chain: ``path, params = params_in(raw_params, root, model=...)``, then
``manifest = prepared(params)``, then ``model = tiny_checkpoint(params, manifest, root)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from convpipe.config.edit import set_dotted
from convpipe.config.schema import Params, TrainParams, parse_params
from convpipe.data.manifest import Manifest, load_split
from convpipe.data.prepare import write_prepared
from convpipe.data.sources import open_source
from convpipe.data.transforms.normalize import normalize_batch
from convpipe.models.module import CNNClassifier
from tests.helpers.models import fit_and_save


def params_in(
    raw_params: dict[str, Any],
    root: Path,
    *,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    mlflow_store: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[Path, Params]:
    """``root/params.yaml``: the shipped params with every ``paths:`` entry under ``root``.

    Args:
        raw_params: The shipped params as a plain dict (the ``raw_params`` fixture).
        root: The folder: its params file, prepared data, model and outputs.
        model: A whole ``model:`` section (``model_section(...)``), or the shipped one.
        data: ``data:`` keys to change (``{"source": "imagefolder", "path": ...}``).
        train: ``train:`` keys to change.
        mlflow_store: Track into ``root/mlflow.db`` (sqlite) rather than the shipped URI.
        overrides: Dotted keys set last (``{"train.batch_size": 8}``).

    Returns:
        The params file and its validated params.
    """
    raw = copy.deepcopy(raw_params)
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    raw["data"].update(data or {})
    raw["train"].update(train or {})
    if model is not None:
        raw["model"] = model
    if mlflow_store:
        raw["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, parse_params(raw)


def prepared(params: Params) -> Manifest:
    """Run the prepare stage's work for ``params`` (``data:`` into ``paths.prepared``)."""
    return write_prepared(
        open_source(params.data), params.data, params.base.seed, params.paths.prepared
    )


def classifier_for(
    params: Params, manifest: Manifest, train_size: int, **train: Any
) -> CNNClassifier:
    """A fresh :class:`CNNClassifier` of ``params.model`` for ``manifest``'s images and classes.

    ``train`` overrides keys of ``params.train`` (``max_epochs=1``).
    """
    return CNNClassifier(
        params.model,
        TrainParams.model_validate({**params.train.model_dump(), **train}),
        manifest.channels,
        manifest.image_hw,
        manifest.num_classes,
        train_size,
        manifest.class_names,
    )


def tiny_checkpoint(
    params: Params,
    manifest: Manifest,
    root: Path,
    *,
    steps: int = 1,
    images: Literal["noise", "train"] = "noise",
    count: int = 20,
    seed: int = 0,
    **train: Any,
) -> CNNClassifier:
    """Train ``params.model`` for ``steps`` optimiser steps and save it at ``paths.model``.

    A few steps move the weights and batch-norm statistics away from their start, which is
    all most tests of checkpoints need; ``images="train"`` trains on the prepared training
    images (normalised as the pipeline does) when the predictions must mean something.

    Args:
        params: With ``paths.model`` (where the Lightning checkpoint is written).
        manifest: The prepared data the model is for.
        root: Lightning's working folder.
        steps: Optimiser steps (``max_steps``), one batch each.
        images: ``noise``: ``count`` Gaussian images with round-robin labels; ``train``: the
            first ``count`` prepared training images and their labels.
        count: Images per batch (and in all).
        seed: Seeds the weights and the noise.
        **train: Overrides of ``params.train`` for the module (``max_epochs=1``).

    Returns:
        The trained module (in the state the checkpoint holds).
    """
    torch.manual_seed(seed)
    model = classifier_for(params, manifest, count, **{"max_epochs": 1, **train})
    if images == "train":
        x, y = load_split(params.paths.prepared, manifest, "train")
        inputs = normalize_batch(torch.from_numpy(np.array(x[:count])), manifest.mean, manifest.std)
        labels = torch.from_numpy(np.asarray(y[:count]))
    else:
        inputs = torch.randn(count, manifest.channels, *manifest.image_hw)
        labels = torch.arange(count) % manifest.num_classes
    data = DataLoader(TensorDataset(inputs, labels), batch_size=count)
    fit_and_save(model, data, root, params.paths.model, max_steps=steps)
    return model

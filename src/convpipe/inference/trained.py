"""A trained checkpoint and the prepared data it was trained on, checked against each other."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from convpipe.data.manifest import Manifest, load_manifest
from convpipe.errors import ConvpipeError
from convpipe.hardware import inference_device
from convpipe.inference.calibration import read_calibration
from convpipe.models.checkpoint import load_model
from convpipe.models.module import CNNClassifier

__all__ = ["Trained", "check_matches", "load_trained"]

_FIX = "re-run `dvc repro` so model and prepared data match"


class Trained(NamedTuple):
    """A checkpoint in eval mode on its inference device, and its prepared data's manifest."""

    model: CNNClassifier
    manifest: Manifest


def _shape(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def _classes(count: int, names: list[str] | None) -> str:
    listed = f" ({', '.join(map(str, names))[:80]})" if names else ""
    return f"{count} classes{listed}"


def check_matches(model: CNNClassifier, manifest: Manifest, where: str) -> None:
    """Refuse prepared data other than what ``model`` was trained on.

    The one check every consumer of a checkpoint makes: the image geometry ``C x H x W``
    (the manifest's mean/std normalise the input), one mean per channel, and the classes,
    in number and, when the checkpoint stores them, by name and order.

    Args:
        model: The loaded checkpoint.
        manifest: The prepared data's manifest (``manifest.json``).
        where: The location for the error line (``at models/model.ckpt and data/prepared``).

    Raises:
        ConvpipeError: Naming what differs, the model's value and the data's.
    """
    model_shape = (int(model.hparams["in_channels"]), *map(int, model.hparams["image_hw"]))
    data_shape = (manifest.channels, *manifest.image_hw)
    if model_shape != data_shape or len(manifest.mean) != manifest.channels:
        raise ConvpipeError(
            f"the model was trained on {_shape(model_shape)} images but the "
            f"prepared data is {_shape(data_shape)}",
            where,
            _FIX,
        )
    stored = model.hparams.get("class_names")  # None in a checkpoint saved without names
    names = list(stored) if stored else None
    if model.num_classes != manifest.num_classes or names not in (None, manifest.class_names):
        raise ConvpipeError(
            f"the checkpoint's {_classes(model.num_classes, names)} are not the prepared "
            f"data's {_classes(manifest.num_classes, manifest.class_names)}",
            where,
            _FIX,
        )


def load_trained(
    checkpoint: str | Path,
    prepared: str | Path,
    accelerator: str = "cpu",
    calibration: str | Path | None = None,
) -> Trained:
    """Load ``checkpoint`` (weights only), check it against ``prepared``, move it for inference.

    Args:
        checkpoint: The Lightning checkpoint (``paths.model``).
        prepared: The prepared data folder holding ``manifest.json`` (``paths.prepared``).
        accelerator: ``train.accelerator``: a GPU is used when it allows one and one is present
            (:func:`convpipe.hardware.inference_device`).
        calibration: ``paths.calibration``: the model divides its logits by the temperature
            stored there for this checkpoint (:mod:`convpipe.inference.calibration`); None
            for the raw logits.

    Returns:
        The model, in eval mode on that device, and the manifest.

    Raises:
        ConvpipeError: A missing or unsafe checkpoint, a missing manifest, data the model
            was not trained on (:func:`check_matches`), or a damaged calibration file.
    """
    manifest = load_manifest(prepared)
    model = load_model(checkpoint)
    check_matches(model, manifest, f"at {checkpoint} and {prepared}")
    model.temperature = read_calibration(calibration, checkpoint)
    model.to(inference_device(accelerator)).eval()
    return Trained(model, manifest)

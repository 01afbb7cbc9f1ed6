"""``convpipe export``: read the checkpoint and prepared data, export, check, then write."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from convpipe.config.schema import Params
from convpipe.data.datamodule import EVAL_BATCH_SIZE
from convpipe.errors import ConvpipeError
from convpipe.inference.predict import predict_logits, prepared_split
from convpipe.inference.trained import load_trained
from convpipe.io import atomic_path
from convpipe.tools.export.load import load_exported
from convpipe.tools.export.metadata import export_metadata
from convpipe.tools.export.parity import TOLERANCE, Parity, parity, run_batches
from convpipe.tools.export.serialize import require_onnx, serialize
from convpipe.tools.formats import EXPORT_SUFFIXES

__all__ = ["ExportResult", "default_output", "export_checkpoint"]


class ExportResult(NamedTuple):
    """What :func:`export_checkpoint` wrote.

    Attributes:
        path: The exported file.
        fmt: ``torchscript`` or ``onnx``.
        size: Its size in bytes.
        parity: Exported against checkpoint logits on the test split.
    """

    path: Path
    fmt: str
    size: int
    parity: Parity


def default_output(checkpoint: str | Path, fmt: str) -> Path:
    """``models/model.ckpt`` -> ``models/model.pt2``, ``.onnx`` or ``.torchscript.pt``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + EXPORT_SUFFIXES[fmt])


def _check_output(output: Path, checkpoint: Path) -> None:
    if output.is_dir():
        raise ConvpipeError(
            "--output is a folder", f"at {output}", "give a file path, e.g. models/model.onnx"
        )
    if output.resolve() == checkpoint.resolve():
        raise ConvpipeError(
            "--output is the checkpoint itself", f"at {output}", "give another file path"
        )


def export_checkpoint(params: Params, fmt: str, output: str | Path | None) -> ExportResult:
    """Export ``params.paths.model``, check it on the test split, then write it atomically.

    Args:
        params: The validated params (paths.model, paths.prepared).
        fmt: ``torchscript`` or ``onnx``.
        output: Where to write, or None for :func:`default_output` beside the checkpoint.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ConvpipeError: A missing or unsafe checkpoint, missing prepared data or data the model
            was not trained on, a bad ``output``, an empty test split, ``onnx`` without its
            extra, or exported logits further than :data:`TOLERANCE` from the checkpoint's
            (then nothing is written).
    """
    checkpoint = Path(params.paths.model)
    target = Path(output) if output is not None else default_output(checkpoint, fmt)
    _check_output(target, checkpoint)
    if fmt == "onnx":
        require_onnx()  # before the slow parts, so a missing extra is the first thing said
    model, manifest = load_trained(
        checkpoint, params.paths.prepared, calibration=params.paths.calibration
    )
    dataset = prepared_split(params.paths.prepared, "test", params.base.seed)
    if len(dataset) == 0:
        raise ConvpipeError(
            "the test split is empty: the export cannot be checked",
            f"in {params.paths.prepared}",
            "set data.test_fraction > 0 and re-run `dvc repro prepare`",
        )
    data = serialize(model, fmt, export_metadata(model, manifest))
    run, _ = load_exported(data, fmt)
    with torch.no_grad():
        # "none": an export is the network alone; test-time augmentation is the caller's
        reference = predict_logits(model, dataset, EVAL_BATCH_SIZE, "none")
        result = parity(reference, run_batches(run, dataset))
    if not result.ok:
        raise ConvpipeError(
            f"the {fmt} export differs from the checkpoint by up to {result.max_abs_diff:.3g} "
            f"on {result.images} test images (tolerance {TOLERANCE:g}; logits up to "
            f"{result.max_abs_logit:.3g}), so nothing was written",
            f"for {checkpoint}",
            "try the other --format, or report it with your torch and onnxruntime versions",
        )
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise ConvpipeError(
            f"cannot write the export ({exc.strerror or exc})", f"at {target}", ""
        ) from None
    return ExportResult(target, fmt, len(data), result)

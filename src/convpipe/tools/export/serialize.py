"""The network and its metadata as the bytes of a pt2, ONNX or TorchScript file."""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from convpipe.errors import ConvpipeError
from convpipe.models.module import CNNClassifier
from convpipe.tools.export.metadata import EXTRA_FILE, onnx_props
from convpipe.tools.export.network import INPUT_NAME, OUTPUT_NAME, LogitsNet
from convpipe.tools.formats import EXPORT_SUFFIXES

__all__ = ["FORMATS", "ONNX_EXTRA", "quiet_exporters", "require_onnx", "serialize"]

FORMATS = tuple(EXPORT_SUFFIXES)
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
ONNX_EXTRA = "pip install 'convpipe[onnx]'"
# torch.export specialises a dimension of size 0 or 1 to a constant: trace with two images so
# the batch dimension stays free.
_EXAMPLE_BATCH = 2


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence what torch says while exporting or loading: deprecations, optional-op notices.

    ``torch.jit`` is deprecated in torch 2.13 but TorchScript is what was asked for; the ONNX
    exporter logs a warning per torchvision operator it cannot register. Real errors still
    raise.
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch's own API churn (torch.jit, pytree specs): nothing an exporting user can fix
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _torchscript_bytes(net: LogitsNet, metadata: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with quiet_exporters():
        scripted = torch.jit.script(net)
        torch.jit.save(scripted, buf, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buf.getvalue()


def _pt2_bytes(net: LogitsNet, metadata: dict[str, Any]) -> bytes:
    example = torch.zeros(_EXAMPLE_BATCH, net.channels, net.height, net.width)
    buf = io.BytesIO()
    with quiet_exporters():
        program = torch.export.export(
            net, (example,), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim.DYNAMIC}}
        )
        torch.export.save(program, buf, extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buf.getvalue()


def _onnx_bytes(net: LogitsNet, metadata: dict[str, Any]) -> bytes:
    example = torch.zeros(_EXAMPLE_BATCH, net.channels, net.height, net.width)
    with quiet_exporters():
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: "N"}},
            dynamo=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no program")
    program.model.metadata_props.update(onnx_props(metadata))
    program.model.doc_string = (
        "convpipe CNN classifier: normalised float32 images (N, C, H, W) -> logits; "
        "see the metadata_props"
    )
    return bytes(program.model_proto.SerializeToString())


def require_onnx() -> None:
    """Check the ``onnx`` extra is installed.

    Raises:
        ConvpipeError: Naming the first missing module and the pip command that installs them.
    """
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConvpipeError(
                f"--format onnx needs the Python package {name}, which is not installed",
                "in this environment",
                ONNX_EXTRA,
            ) from None


def serialize(model: CNNClassifier, fmt: str, metadata: dict[str, Any]) -> bytes:
    """The exported file's bytes.

    Args:
        model: The trained classifier (exported in eval mode; its mode is restored after).
        fmt: ``pt2``, ``onnx`` or ``torchscript``.
        metadata: From :func:`export_metadata`, embedded in the file.

    Returns:
        A ``torch.export`` archive (``torch.export.save``), an ONNX ``ModelProto`` or a
        TorchScript archive (``torch.jit.save``), weights inside, mapping ``images`` float32
        ``(N, C, H, W)`` (N free) to ``logits`` as ``model(images)``.

    Raises:
        ConvpipeError: For ``onnx`` without the ``onnx`` extra installed.
        ValueError: For an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}, expected one of {FORMATS}")
    if fmt == "onnx":
        require_onnx()
    was_training = model.training
    model.eval()  # dropout off, batch norm on its running statistics
    try:
        net = LogitsNet(model).eval()
        with torch.no_grad():
            if fmt == "pt2":
                return _pt2_bytes(net, metadata)
            if fmt == "torchscript":
                return _torchscript_bytes(net, metadata)
            return _onnx_bytes(net, metadata)
    finally:
        model.train(was_training)

"""An exported file loaded the way a consumer loads it (torch.export, onnxruntime, torch.jit)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convpipe.tools.export.metadata import EXTRA_FILE, from_onnx_props
from convpipe.tools.export.network import INPUT_NAME, OUTPUT_NAME, Runner
from convpipe.tools.export.serialize import FORMATS, quiet_exporters, require_onnx

__all__ = ["load_exported"]


def _load_torchscript(data: bytes) -> tuple[Runner, dict[str, Any]]:
    extra = {EXTRA_FILE: ""}
    with quiet_exporters():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    module.eval()

    @torch.no_grad()
    def run(images: Tensor) -> Tensor:
        return module(images)

    raw = extra[EXTRA_FILE]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return run, json.loads(text) if text else {}


def _load_pt2(data: bytes) -> tuple[Runner, dict[str, Any]]:
    extra = {EXTRA_FILE: ""}
    with quiet_exporters():
        # torch.export.load reads weights without unpickling code (its own serde format)
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    module = program.module()

    @torch.no_grad()
    def run(images: Tensor) -> Tensor:
        return module(images)

    text = extra[EXTRA_FILE]
    return run, json.loads(text) if text else {}


def _load_onnx(data: bytes) -> tuple[Runner, dict[str, Any]]:
    require_onnx()
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        feed = {INPUT_NAME: images.detach().cpu().numpy().astype("float32", copy=False)}
        return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])

    return run, from_onnx_props(dict(session.get_modelmeta().custom_metadata_map))


def load_exported(source: bytes | str | Path, fmt: str) -> tuple[Runner, dict[str, Any]]:
    """Load an exported model the way a consumer would (``torch.export.load``, onnxruntime, ...).

    Args:
        source: The file's bytes, or its path.
        fmt: ``pt2``, ``onnx`` or ``torchscript``.

    Returns:
        ``(run, metadata)``: ``run`` maps float32 ``(N, C, H, W)`` to the logits tensor, and
        ``metadata`` is the embedded :func:`export_metadata` object.

    Raises:
        ConvpipeError: For ``onnx`` without the ``onnx`` extra installed.
        ValueError: For an unknown ``fmt``.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if fmt == "pt2":
        return _load_pt2(data)
    if fmt == "torchscript":
        return _load_torchscript(data)
    if fmt == "onnx":
        return _load_onnx(data)
    raise ValueError(f"unknown format {fmt!r}, expected one of {FORMATS}")

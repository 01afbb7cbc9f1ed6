"""``convpipe export``: the network as pt2, ONNX or TorchScript, checked against the checkpoint.

The exported model is the checkpoint's network in eval mode and nothing else:

    input  ``images``: float32 ``(N, C, H, W)``, already normalised as in training
                       (``(pixel / 255 - mean[c]) / std[c]``), N free
    output ``logits``: float32 ``(N,)`` for 2 classes (the logit of class 1), else ``(N, K)``

exactly like :meth:`convpipe.models.module.CNNClassifier.forward`. What a consumer needs to use it
(class names, mean/std, channels, image size, sigmoid or softmax) travels inside the file, as
the JSON object of :func:`export_metadata`: in pt2 (``torch.export``'s ExportedProgram, the
successor of TorchScript) and in TorchScript (deprecated upstream, kept working) the extra file
``convpipe.json`` (``torch.export.load(path, extra_files=...)`` /
``torch.jit.load(path, _extra_files={"convpipe.json": ""})``), in ONNX the model's
``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``), one entry
per key, strings as they are and every other value as JSON text.

Serialising (:func:`serialize`), loading (:func:`load_exported`) and comparing
(:func:`parity`) work on bytes and tensors; :func:`export_checkpoint` is the one function that
reads the checkpoint and the prepared data and writes the file, and only after the exported
bytes reproduced the checkpoint's logits on the test split within :data:`TOLERANCE`.

Modules: ``network`` (:class:`LogitsNet`, what is exported), ``metadata``, ``serialize``
(bytes per format), ``load`` (as a consumer loads them), ``parity`` and ``command``
(:func:`export_checkpoint`). Their public names are importable from here.
"""

from __future__ import annotations

from convpipe.tools.export.command import ExportResult, default_output, export_checkpoint
from convpipe.tools.export.load import load_exported
from convpipe.tools.export.metadata import export_metadata
from convpipe.tools.export.network import LogitsNet
from convpipe.tools.export.parity import TOLERANCE, Parity, parity, run_batches
from convpipe.tools.export.serialize import FORMATS, require_onnx, serialize

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportResult",
    "LogitsNet",
    "Parity",
    "default_output",
    "export_checkpoint",
    "export_metadata",
    "load_exported",
    "parity",
    "require_onnx",
    "run_batches",
    "serialize",
]

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
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from convpipe import __version__
from convpipe.config.schema import Params
from convpipe.data.datamodule import EVAL_BATCH_SIZE, ArrayDataset
from convpipe.data.manifest import Manifest
from convpipe.errors import ConvpipeError
from convpipe.inference.predict import predict_logits, prepared_split
from convpipe.inference.trained import load_trained
from convpipe.io import atomic_path
from convpipe.models.module import CNNClassifier
from convpipe.tools.formats import EXPORT_SUFFIXES

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

SUFFIXES = EXPORT_SUFFIXES
FORMATS = tuple(EXPORT_SUFFIXES)
#: Largest absolute difference allowed between exported and checkpoint logits.
TOLERANCE = 1e-5
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXTRA_FILE = "convpipe.json"  # pt2 and TorchScript: the metadata as one JSON extra file
METADATA_VERSION = 1
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
ONNX_EXTRA = "pip install 'convpipe[onnx]'"
# torch.export specialises a dimension of size 0 or 1 to a constant: trace with two images so
# the batch dimension stays free.
_EXAMPLE_BATCH = 2

Runner = Callable[[Tensor], Tensor]


class LogitsNet(nn.Module):
    """The checkpoint's network as a plain module: what gets exported.

    :class:`~convpipe.models.module.CNNClassifier` carries Lightning state and raises
    :class:`ConvpipeError` from ``forward``; neither can be scripted or exported, so this
    module holds only the ``nn.Sequential`` and repeats the shape check with a plain error.

    Args:
        model: The trained classifier (its ``net`` is shared, not copied).
    """

    def __init__(self, model: CNNClassifier) -> None:
        super().__init__()
        self.net = model.net
        self.binary = bool(model.binary)
        channels, height, width = model.input_shape
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.message = f"expected a float32 batch of shape (N, {channels}, {height}, {width})"

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N,)`` (2 classes) or ``(N, K)`` for normalised float ``(N, C, H, W)``."""
        shape = images.shape
        if (
            images.dim() != 4
            or shape[1] != self.channels
            or shape[2] != self.height
            or shape[3] != self.width
        ):
            raise ValueError(self.message)
        logits = self.net(images)
        return logits[:, 0] if self.binary else logits


# --------------------------------------------------------------------------- metadata


def export_metadata(model: CNNClassifier, manifest: Manifest) -> dict[str, Any]:
    """What a consumer of the exported file needs, as plain JSON-able data.

    Args:
        model: The trained classifier.
        manifest: The prepared data it was trained on (mean/std and class names).

    Returns:
        ``class_names``, ``num_classes``, ``channels``, ``image_size`` ``[H, W]``, ``mean``,
        ``std``, input/output names and shapes (``"N"`` for the free batch dimension),
        ``preprocessing``, ``probabilities`` (``sigmoid`` for 2 classes, else ``softmax``) and
        ``postprocessing`` saying how to turn the logits into class probabilities.
    """
    names = list(model.hparams.get("class_names") or manifest.class_names)
    channels, height, width = model.input_shape
    binary = model.binary
    output_shape: list[Any] = ["N"] if binary else ["N", model.num_classes]
    if binary:
        post = f"p = sigmoid(logit) is the probability of '{names[1]}', 1 - p that of '{names[0]}'"
    else:
        post = "softmax over the last dimension gives the probabilities of class_names, in order"
    return {
        "metadata_version": METADATA_VERSION,
        "producer": f"convpipe {__version__}",
        "class_names": names,
        "num_classes": model.num_classes,
        "channels": channels,
        "image_size": [height, width],
        "mean": [float(v) for v in manifest.mean],
        "std": [float(v) for v in manifest.std],
        "input_name": INPUT_NAME,
        "input_shape": ["N", channels, height, width],
        "input_dtype": "float32",
        "preprocessing": (
            f"{'grey' if channels == 1 else 'RGB'} image resized to {height}x{width} (bilinear); "
            "x = (pixel / 255 - mean[c]) / std[c]; layout NCHW"
        ),
        "output_name": OUTPUT_NAME,
        "output_shape": output_shape,
        "probabilities": "sigmoid" if binary else "softmax",
        "postprocessing": post,
    }


# metadata values that are strings: stored as they are in ONNX metadata_props, not as JSON
_TEXT_KEYS = frozenset(
    (
        "producer",
        "input_name",
        "input_dtype",
        "preprocessing",
        "output_name",
        "probabilities",
        "postprocessing",
    )
)


def _onnx_props(metadata: dict[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props`` (string to string): strings as they are, the rest as JSON."""
    return {k: v if k in _TEXT_KEYS else json.dumps(v) for k, v in metadata.items()}


def _from_onnx_props(props: dict[str, str]) -> dict[str, Any]:
    """Invert :func:`_onnx_props`; the exporter's own ``pkg.*`` entries are left out."""
    out: dict[str, Any] = {}
    for key, text in props.items():
        if key.startswith("pkg."):
            continue
        try:
            out[key] = text if key in _TEXT_KEYS else json.loads(text)
        except json.JSONDecodeError:  # an entry another tool added
            out[key] = text
    return out


# --------------------------------------------------------------------------- serialising


@contextmanager
def _quiet_exporters() -> Iterator[None]:
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
    with _quiet_exporters():
        scripted = torch.jit.script(net)
        torch.jit.save(scripted, buf, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buf.getvalue()


def _pt2_bytes(net: LogitsNet, metadata: dict[str, Any]) -> bytes:
    example = torch.zeros(_EXAMPLE_BATCH, net.channels, net.height, net.width)
    buf = io.BytesIO()
    with _quiet_exporters():
        program = torch.export.export(
            net, (example,), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim.DYNAMIC}}
        )
        torch.export.save(program, buf, extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buf.getvalue()


def _onnx_bytes(net: LogitsNet, metadata: dict[str, Any]) -> bytes:
    example = torch.zeros(_EXAMPLE_BATCH, net.channels, net.height, net.width)
    with _quiet_exporters():
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
    program.model.metadata_props.update(_onnx_props(metadata))
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


# --------------------------------------------------------------------------- loading


def _load_torchscript(data: bytes) -> tuple[Runner, dict[str, Any]]:
    extra = {EXTRA_FILE: ""}
    with _quiet_exporters():
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
    with _quiet_exporters():
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

    return run, _from_onnx_props(dict(session.get_modelmeta().custom_metadata_map))


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


# --------------------------------------------------------------------------- parity


class Parity(NamedTuple):
    """How far exported logits are from the checkpoint's.

    Attributes:
        images: Images compared.
        max_abs_diff: ``max |exported - reference|`` over every logit (0 for no images).
        max_abs_logit: ``max |reference|``: float32 spacing grows with it, so it tells how
            much of the difference rounding alone explains.
    """

    images: int
    max_abs_diff: float
    max_abs_logit: float

    @property
    def ok(self) -> bool:
        """Whether the difference is within :data:`TOLERANCE`."""
        return self.max_abs_diff <= TOLERANCE


def parity(reference: Tensor, exported: Tensor) -> Parity:
    """Compare exported logits with the checkpoint's.

    Args:
        reference: The checkpoint's logits, ``(N,)`` or ``(N, K)``.
        exported: The exported model's logits for the same images, same shape.

    Returns:
        The :class:`Parity` of the two; a NaN anywhere counts as an infinite difference.

    Raises:
        ValueError: If the shapes differ.
    """
    if tuple(reference.shape) != tuple(exported.shape):
        raise ValueError(
            f"exported logits have shape {tuple(exported.shape)}, "
            f"the checkpoint's {tuple(reference.shape)}"
        )
    if reference.numel() == 0:
        return Parity(int(reference.shape[0]), 0.0, 0.0)
    ref, out = reference.double(), exported.double()
    diff = (out - ref).abs().nan_to_num(nan=float("inf"))
    return Parity(int(reference.shape[0]), float(diff.max()), float(ref.abs().max()))


def run_batches(run: Runner, dataset: ArrayDataset, batch: int = EVAL_BATCH_SIZE) -> Tensor:
    """Logits of ``run`` for every image of ``dataset``, in order, ``batch`` images at a time.

    The batching of :func:`convpipe.inference.predict.predict_logits`: both see the same
    batches.
    """
    outputs = []
    for start in range(0, len(dataset), batch):
        images, _ = dataset.__getitems__(list(range(start, min(start + batch, len(dataset)))))
        outputs.append(run(images))
    return torch.cat(outputs)


# --------------------------------------------------------------------------- the command


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
    return path.with_name(path.stem + SUFFIXES[fmt])


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
    model, manifest = load_trained(checkpoint, params.paths.prepared)
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

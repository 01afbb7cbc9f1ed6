"""Starting a network from trained weights (``model.init_from``), and freezing its backbone.

The *backbone* is ``net.features``: the conv blocks and the residual stages. The *head* is
``net.classifier``: the global pooling, the hidden dense layers and the output layer.

:func:`read_weights` reads a file with ``torch.load(weights_only=True)`` only: a convpipe
(Lightning) checkpoint, whose hyperparameters are checked as for any checkpoint, or a plain
state dict in convpipe's layout (``features.0.conv.weight``, ... with or without the ``net.``
prefix). :func:`transfer_weights` then copies what fits: every backbone tensor must be there
with the same shape (else it is another architecture, or images with other channels: one
error line); a head tensor is taken when its shape matches, and the output layer only when
the classes are the same too: for other classes it stays newly initialised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convpipe.errors import ConvpipeError
from convpipe.models.checkpoint import check_hyperparameters, load_failure
from convpipe.models.network import BACKBONE

__all__ = ["SourceWeights", "Transfer", "read_weights", "transfer_weights"]

#: The output layer: rebuilt for other classes, even when their number is the same.
OUTPUT = "classifier.out"
_FIX = "set model.init_from to a convpipe checkpoint or weights file of this network"


@dataclass
class SourceWeights:
    """The tensors of a trained network, by their key in ``CNNClassifier.net``.

    Attributes:
        state: ``features.0.conv.weight`` -> tensor, ...
        class_names: The classes it was trained on, in label order, when the file says.
    """

    state: dict[str, Tensor]
    class_names: list[str] | None = None


@dataclass
class Transfer:
    """What :func:`transfer_weights` took from the source and what it left new.

    Attributes:
        taken: Keys copied from the source.
        new: Keys left as initialised (the head's, for new classes or another head).
        why_new: Why the head was not taken, for the log line ("" when all was taken).
    """

    taken: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    why_new: str = ""

    def describe(self, source: str) -> str:
        """One line: how many tensors came from ``source`` and which layers are new."""
        total = len(self.taken) + len(self.new)
        line = f"model.init_from: took {len(self.taken)} of {total} tensors from {source}"
        if not self.new:
            return line + " (every layer)"
        layers = sorted({key.rsplit(".", 1)[0] for key in self.new})
        return line + f"; new: {', '.join(layers)}" + (f" ({self.why_new})" if self.why_new else "")


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvpipeError(
            "model.init_from names no file", f"at {path}", "check the path, or leave it empty"
        ) from None
    except IsADirectoryError:
        raise ConvpipeError("model.init_from is a folder", f"at {path}", _FIX) from None
    except Exception as exc:  # torch raises many types for corrupt or code-carrying files
        error = load_failure(exc, path)
        raise ConvpipeError(
            error.what.replace("checkpoint", "model.init_from", 1), error.where, _FIX
        ) from None


def _tensors(mapping: Mapping[Any, Any], path: Path) -> dict[str, Tensor]:
    """``mapping`` as net keys -> tensors: the ``net.`` prefix dropped, tensors only."""
    out: dict[str, Tensor] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ConvpipeError(
                f"model.init_from holds {type(value).__name__} at key {key!r}, not a tensor",
                f"at {path}",
                _FIX,
            )
        out[key.removeprefix("net.")] = value
    return out


def read_weights(path: str | Path) -> SourceWeights:
    """The network tensors in a convpipe checkpoint or weights file, read weights-only.

    Args:
        path: A Lightning checkpoint written by convpipe (its ``state_dict`` under ``net.``;
            hyperparameters checked as :func:`convpipe.models.checkpoint.check_hyperparameters`
            does), or a ``torch.save``-d state dict of ``CNNClassifier.net``.

    Returns:
        The tensors and, from a checkpoint, the class names.

    Raises:
        ConvpipeError: A missing, truncated or code-carrying file; anything but tensors.
    """
    path = Path(path)
    content = _load(path)
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        hparams = check_hyperparameters(content, path)
        state = {k: v for k, v in content["state_dict"].items() if str(k).startswith("net.")}
        names = hparams.get("class_names")
        return SourceWeights(_tensors(state, path), list(names) if names else None)
    if isinstance(content, Mapping) and content:
        return SourceWeights(_tensors(content, path))
    raise ConvpipeError(
        f"model.init_from is not a checkpoint or a state dict (a {type(content).__name__})",
        f"at {path}",
        _FIX,
    )


def _backbone_mismatch(key: str, there: Tensor | None, here: Tensor, source: str) -> ConvpipeError:
    if there is None:
        what = f"it has no {key}: another architecture"
    elif key == f"{BACKBONE}.0.conv.weight" and there.shape[1] != here.shape[1]:
        what = (
            f"it was trained on {there.shape[1]}-channel images, the data has {here.shape[1]} "
            "channels"
        )
    else:
        what = (
            f"its {key} is {tuple(there.shape)}, this network's {tuple(here.shape)}: another "
            "architecture"
        )
    return ConvpipeError(
        f"cannot start from model.init_from: {what}",
        f"at {source}",
        "use the same model.conv and model.stages (and data.channels) as the source",
    )


def transfer_weights(
    net: nn.Module, source: SourceWeights, where: str, class_names: Sequence[str] | None
) -> Transfer:
    """Copy ``source``'s tensors into ``net`` where they fit; see the module docstring.

    Args:
        net: ``CNNClassifier.net`` (``features`` + ``classifier``).
        source: From :func:`read_weights`.
        where: The source as the user named it (masked), for messages.
        class_names: This data's classes: the head is rebuilt when the source's differ.

    Returns:
        What was taken and what is new.

    Raises:
        ConvpipeError: A backbone tensor missing, extra or of another shape.
    """
    target = net.state_dict()
    extra = sorted(k for k in source.state if k.startswith(f"{BACKBONE}.") and k not in target)
    if extra:
        raise ConvpipeError(
            f"cannot start from model.init_from: it has layers this network lacks ({extra[0]}, "
            f"{len(extra)} in all): another architecture",
            f"at {where}",
            "use the same model.conv and model.stages as the source",
        )
    same_classes = source.class_names is None or class_names is None
    same_classes = same_classes or list(source.class_names or []) == list(class_names or [])
    result = Transfer()
    merged: dict[str, Tensor] = {}
    for key, here in target.items():
        there = source.state.get(key)
        if there is None or there.shape != here.shape:
            if key.startswith(f"{BACKBONE}."):
                raise _backbone_mismatch(key, there, here, where)
            result.new.append(key)
            continue
        if not same_classes and key.startswith(f"{OUTPUT}."):
            result.new.append(key)
            continue
        merged[key] = there.to(dtype=here.dtype)
        result.taken.append(key)
    if result.new:
        result.why_new = _why_new(source, class_names, same_classes)
    net.load_state_dict(merged, strict=False)
    return result


def _why_new(source: SourceWeights, class_names: Sequence[str] | None, same_classes: bool) -> str:
    if not same_classes:
        there, here = len(source.class_names or []), len(class_names or [])
        return f"other classes: {there} there, {here} here"
    return "another head: other shapes"

"""Reading checkpoints without running anything in them, and writing them whole.

:func:`load_model` is how every command gets a trained model from a file.

Every command that loads a checkpoint (evaluate, predict, export, feature maps, the registered
model, resuming a training) reads it here first: ``torch.load(weights_only=True)`` refuses
pickled code, and :func:`check_hyperparameters` refuses hyperparameters that convpipe never
writes. The second matters because Lightning before 2.6.6 imports and calls an
``_instantiator`` named in a checkpoint's hyperparameters inside ``load_from_checkpoint``,
even with ``weights_only=True`` (CVE-2026-58659): such a checkpoint is stopped before
Lightning sees it, and convpipe builds the model from the checked values itself.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from convpipe.errors import ConvpipeError
from convpipe.io import atomic_path
from convpipe.models.module import CNNClassifier

#: What ``CNNClassifier.save_hyperparameters`` stores: nothing else may be in a checkpoint.
HPARAM_KEYS = frozenset(
    {"model", "train", "in_channels", "image_hw", "num_classes", "train_size", "class_names"}
)
HPARAMS = "hyper_parameters"
_PLAIN = (str, int, float, bool, type(None))
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights-only unpickler names the global it refused at the end of a long message
# (torch 2.13 words it "unsupported GLOBAL posix.system whose module posix is blocked" when
# the module is on its block list)
_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")
_ADVICE = "retrain with `dvc repro train`; never load checkpoints from untrusted sources"


def load_failure(exc: Exception, path: str | Path) -> ConvpipeError:
    """The one-line error for a checkpoint torch could not load."""
    text = " ".join(_ANSI_ESCAPE.sub("", str(exc)).split())
    refused = _REFUSED_GLOBAL.search(text)
    if refused:  # say which code it would run, not torch's advice to load it unsafely
        what = f": it would run code ({refused.group(1)}) instead of only loading weights"
    else:  # the first sentence says what broke; torch's advice after it does not fit a line
        what = f" ({type(exc).__name__}: {text.split('. ')[0][:200] or 'the file ends early'})"
    return ConvpipeError(f"cannot load checkpoint{what}", f"at {path}", _ADVICE)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True`` on the CPU.

    Raises:
        ConvpipeError: If the file is missing, truncated, not a checkpoint, or would run code.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvpipeError("checkpoint not found", f"at {path}", "run `dvc repro train`") from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise load_failure(exc, path) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConvpipeError(
            "cannot load checkpoint: not a Lightning checkpoint (no state_dict)",
            f"at {path}",
            _ADVICE,
        )
    return checkpoint


def _not_plain(value: Any, where: str) -> str | None:
    """The dotted place of the first value that is not plain data (JSON-like), if any."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} (key {key!r})"
            found = _not_plain(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next(
            (f for i, item in enumerate(value) if (f := _not_plain(item, f"{where}[{i}]"))), None
        )
    return None if isinstance(value, _PLAIN) else f"{where} ({type(value).__name__})"


def check_hyperparameters(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's hyperparameters, if they are exactly what convpipe writes.

    Returns:
        The hyperparameters, ready for ``CNNClassifier(**hparams)``.

    Raises:
        ConvpipeError: naming an unknown key (``_instantiator``, ``_class_path``, ...), a
            missing one, or a value that is not plain data.
    """
    hparams = checkpoint.get(HPARAMS)
    if not isinstance(hparams, Mapping):
        raise ConvpipeError(
            "cannot load checkpoint: it has no hyperparameters", f"at {path}", _ADVICE
        )
    unknown = sorted(str(key) for key in hparams if key not in HPARAM_KEYS)
    if unknown:
        raise ConvpipeError(
            "cannot load checkpoint: its hyperparameters hold keys convpipe never writes "
            f"({', '.join(unknown)}), refused before loading",
            f"at {path}",
            _ADVICE,
        )
    missing = sorted(HPARAM_KEYS - set(hparams))
    if missing:
        raise ConvpipeError(
            f"cannot load checkpoint: its hyperparameters lack {', '.join(missing)}",
            f"at {path}",
            _ADVICE,
        )
    odd = _not_plain(hparams, HPARAMS)
    if odd:
        raise ConvpipeError(
            f"cannot load checkpoint: a hyperparameter is not plain data: {odd}",
            f"at {path}",
            _ADVICE,
        )
    return dict(hparams)


# Below this many free bytes a failed checkpoint write is taken for a full disk.
FULL_DISK_BYTES = 1 << 20


def _space_left(path: Path) -> int:
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return FULL_DISK_BYTES  # cannot tell: not a full disk
    return stat.f_bavail * stat.f_frsize


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks.

    Lightning writes a local checkpoint to a temporary file in the system's temp folder and
    moves it into place; when that folder is another filesystem (a tmpfs ``/tmp``), the move
    is a copy over the old file, and a kill during it leaves a truncated ``last.ckpt`` and
    no good one. Here the temporary file is a sibling, renamed over the target once complete.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` so that it appears complete or not at all."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            try:
                torch.save(checkpoint, tmp)
            except RuntimeError as exc:
                # torch's writer reports a full disk as "unexpected pos" or "file write
                # failed"; the space left (before the partial file is removed) tells
                if _space_left(tmp) < FULL_DISK_BYTES:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) from exc
                raise


def load_model(path: str | Path) -> CNNClassifier:
    """Load a checkpoint safely, in eval mode.

    The file is read with ``weights_only=True`` and its hyperparameters are checked to be
    exactly what convpipe writes (:func:`check_hyperparameters`); the model is then built from
    them here, so nothing in the file is ever imported or called.

    Raises:
        ConvpipeError: If the file is missing, corrupt, unsafe, or not a convpipe model.
    """
    checkpoint = read_checkpoint(path)
    hparams = check_hyperparameters(checkpoint, path)
    try:
        model = CNNClassifier(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except ConvpipeError as exc:
        raise ConvpipeError(
            f"cannot load checkpoint: its hyperparameters are invalid: {exc.what}",
            f"at {path}",
            "retrain with `dvc repro train`",
        ) from None
    except (RuntimeError, TypeError, ValueError) as exc:  # weights of another network
        first = " ".join(str(exc).split())[:200]
        raise ConvpipeError(
            f"cannot load checkpoint (its weights do not fit its network: {first})",
            f"at {path}",
            "retrain with `dvc repro train`",
        ) from None
    model.eval()
    return model

"""Temperature scaling: one number, fitted on the validation split, that makes confidences honest.

A network trained to a low loss is often over-confident: its 0.95 is right 85 % of the time.
Guo et al. (2017, "On Calibration of Modern Neural Networks") divide the logits by one
temperature ``T > 0`` that minimises the negative log-likelihood of a held-out split; the
ranking of the classes, and so every prediction and the accuracy, stay as they were.

With ``evaluate.calibration: temperature`` the evaluate stage fits ``T`` on the validation
split (with the ``evaluate.tta`` it evaluates with), writes it to ``paths.calibration`` with
the digest of the checkpoint it belongs to, and every consumer of that checkpoint (evaluate,
``convpipe predict``, export, the registered model) divides by it through
:func:`convpipe.inference.trained.load_trained`. ``none`` writes ``T = 1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor

from convpipe.errors import ConvpipeError
from convpipe.io import write_json

__all__ = [
    "Calibration",
    "checkpoint_digest",
    "fit_temperature",
    "nll",
    "read_calibration",
    "write_calibration",
]

log = logging.getLogger(__name__)

#: The temperatures searched, as ``log T``: from 1/20 to 20 times the logits' scale. A fitted
#: value at either end means the validation split says little (a handful of images).
LOG_T_BOUNDS = (-math.log(20.0), math.log(20.0))
#: How close to a bound (in ``log T``) a minimum counts as on it: no minimum inside
BOUND_MARGIN = 0.01


@dataclass(frozen=True)
class Calibration:
    """What ``paths.calibration`` holds.

    Attributes:
        method: ``evaluate.calibration``: ``none`` or ``temperature``.
        temperature: ``T``: logits are divided by it (1.0 for ``none``).
        checkpoint_sha256: The digest of the checkpoint ``T`` was fitted for.
        fitted_on: The split it was fitted on (``val``), empty for ``none``.
        images: How many images it was fitted on.
        tta: The ``evaluate.tta`` of the logits it was fitted on.
        nll_before: The split's mean negative log-likelihood at ``T = 1``.
        nll_after: ... and at the fitted ``T``.
    """

    method: str
    temperature: float
    checkpoint_sha256: str
    fitted_on: str = ""
    images: int = 0
    tta: str = "none"
    nll_before: float | None = None
    nll_after: float | None = None


def checkpoint_digest(checkpoint: str | Path) -> str:
    """The SHA-256 of a checkpoint file: ties a calibration to the weights it was fitted for."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature``.

    Args:
        logits: ``(N,)`` (2 classes: the logit of class 1) or ``(N, K)``.
        labels: ``(N,)`` class indices.
        temperature: ``T > 0``.
    """
    scaled = logits.double() / temperature
    if scaled.ndim == 1:
        return float(F.binary_cross_entropy_with_logits(scaled, labels.double()))
    return float(F.cross_entropy(scaled, labels))


def fit_temperature(logits: Tensor, labels: Tensor) -> float | None:
    """The ``T`` that minimises :func:`nll` of a held-out split, or None where none does.

    A bounded one-dimensional search over ``log T`` (:data:`LOG_T_BOUNDS`): the NLL is convex
    in ``1/T`` and this needs no learning rate or step count, and gives the same ``T`` for the
    same logits every time. A split the model classifies without a mistake has no minimum:
    its NLL keeps falling as ``T`` goes to 0 (every confidence to 1). That says nothing about
    the images to come, so it gives None (keep ``T = 1``), as does a minimum on a bound.

    Args:
        logits: The validation split's logits, ``(N,)`` or ``(N, K)``.
        labels: Its classes ``(N,)``.

    Returns:
        The temperature, rounded to 4 significant digits (what is stored is what is applied),
        or None for a split without a mistake or a minimum on a bound of the search.

    Raises:
        ConvpipeError: For an empty split.
    """
    if not len(labels):
        raise ConvpipeError(
            "temperature scaling needs validation images but the val split is empty",
            "at evaluate.calibration",
            "set data.val_fraction above 0, or evaluate.calibration: none",
        )
    predicted = logits.argmax(1) if logits.ndim == 2 else (logits > 0).long()
    if bool((predicted == labels).all()):
        return None  # no mistake: the minimum is at T -> 0 (numerically flat long before)
    low, high = LOG_T_BOUNDS
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    log_t = float(result.x)
    if min(log_t - low, high - log_t) < BOUND_MARGIN:
        return None
    return float(f"{math.exp(log_t):.4g}")


def write_calibration(path: str | Path, calibration: Calibration) -> None:
    """Write ``calibration`` to ``path`` (atomically: a temp file, then a rename)."""
    write_json(path, asdict(calibration))


def read_calibration(path: str | Path | None, checkpoint: str | Path) -> float:
    """The temperature to divide ``checkpoint``'s logits by: 1.0 where none applies.

    None applies when ``path`` is None or absent (evaluate has not run yet), or when it was
    fitted for other weights (another ``--checkpoint``, or a checkpoint retrained since
    evaluate ran), which is said in one log line.

    Args:
        path: ``paths.calibration``.
        checkpoint: The checkpoint being loaded.

    Raises:
        ConvpipeError: For a file that is not a calibration (damaged, or edited by hand).
    """
    if path is None or not Path(path).is_file():
        return 1.0
    try:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        temperature = float(stored["temperature"])
        digest = str(stored["checkpoint_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConvpipeError(
            f"the calibration file cannot be read ({type(exc).__name__}: {exc})",
            f"at {path}",
            "delete it and re-run `dvc repro evaluate`",
        ) from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConvpipeError(
            f"the calibration's temperature must be a positive number, got {temperature}",
            f"at {path}",
            "delete it and re-run `dvc repro evaluate`",
        )
    if temperature != 1.0 and digest != checkpoint_digest(checkpoint):
        log.warning(
            "not applying the temperature %s of %s: it was fitted for other weights than %s "
            "(re-run `dvc repro evaluate` to fit it for these)",
            temperature,
            path,
            checkpoint,
        )
        return 1.0
    return temperature

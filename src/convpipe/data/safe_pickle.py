"""Loading CIFAR's python batches without letting a pickle run code.

``pickle.load`` calls any importable function a file names, so a downloaded ``data_batch_1``
could run ``os.system``. The CIFAR batches only need numpy's array reconstruction; every other
global is refused before it is imported, so a hostile file fails with one clear line and no
side effect.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from numpy._core import multiarray

from convpipe.errors import ConvpipeError

_TRUST_HINT = "CIFAR batches hold only arrays, lists and bytes; is this file from a trusted source?"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The one use of ``_codecs.encode`` in plain-data pickles: bytes written by Python 3.

    Protocol 2 has no bytes opcode, so Python 3 stores ``b"..."`` as
    ``_codecs.encode("...", "latin1")``. Only that exact call is honoured; any other codec
    could be a decompression bomb or worse.
    """
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not plain data")
    return text.encode("latin1")


# Everything a real CIFAR batch (pickled by Python 2 with numpy 1.x) or an equivalent batch
# pickled by Python 3 with numpy 2.x may name. The values are the objects themselves, so
# nothing is imported by name at load time.
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`_ALLOWED`."""

    def __init__(self, file: IO[bytes], source_name: str) -> None:
        # CIFAR was pickled by Python 2: its str objects are bytes, not text.
        super().__init__(file, encoding="bytes")
        self._source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse everything else before importing it."""
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise ConvpipeError(
                f"refusing to unpickle {module}.{name}: not plain data",
                f"in {self._source_name}",
                _TRUST_HINT,
            )
        return allowed


def restricted_load(
    fh_or_bytes: bytes | bytearray | memoryview | IO[bytes], source_name: str
) -> Any:
    """Unpickle plain data (dicts, lists, bytes, numbers, numpy arrays) and nothing else.

    Args:
        fh_or_bytes: The pickle, as bytes or a binary file object.
        source_name: The file it came from, for error messages.

    Returns:
        The unpickled object. Text pickled by Python 2 comes back as ``bytes``.

    Raises:
        ConvpipeError: when the pickle names any global outside numpy's array
            reconstruction, or is not a valid (complete) pickle.
    """
    if isinstance(fh_or_bytes, bytes | bytearray | memoryview):
        stream: IO[bytes] = io.BytesIO(fh_or_bytes)
    else:
        stream = fh_or_bytes
    try:
        return _PlainDataUnpickler(stream, source_name).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
    ) as exc:
        # Garbage and truncated files surface as any of these, depending on where the
        # bytes stop making sense; the user needs the file name, not the opcode.
        raise ConvpipeError(
            f"not a valid pickle / truncated ({type(exc).__name__}: {exc})",
            f"in {source_name}",
            "re-download or re-extract the file",
        ) from None

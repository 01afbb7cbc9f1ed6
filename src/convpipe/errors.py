"""One error type for everything a user can fix, and one place that reports it.

Every entry point (DVC stage or console command) runs under :func:`entrypoint`, so a
:class:`ConvpipeError` becomes exactly one line on stderr::

    convpipe: error: <what>, <where>, <what to do>

with a non-zero exit and no traceback (``--debug`` or ``CONVPIPE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from convpipe.redact import install as install_masking
from convpipe.redact import mask

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USER_ERROR = 2
# A full disk or quota is the user's to fix, not a bug: one line, like any user error.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ConvpipeError(Exception):
    """An error caused by input the user controls (params, data, files, servers).

    Args:
        what: What is wrong, naming the argument and the value received.
        where: The file, key or URL it was found in.
        todo: What the user should do about it.

    Attributes:
        exit_code: the process's exit status when this error ends it.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, what: str, where: str | None = None, todo: str | None = None) -> None:
        self.what = what
        self.where = where
        self.todo = todo
        super().__init__(", ".join(part for part in (what, where, todo) if part))

    def line(self) -> str:
        r"""The single line printed on stderr, newlines folded so it stays one line.

        Other control characters (a file name may hold terminal escape sequences) are shown
        escaped, as ``\x1b``, so the line prints as it reads.
        """
        folded = " ".join(str(self).split())
        return "convpipe: error: " + "".join(
            char if char.isprintable() else repr(char)[1:-1] for char in folded
        )


class Preempted(ConvpipeError):
    """A training stopped by a preemption signal, its state saved to resume from.

    Raised by :mod:`convpipe.training.preemption`; the MLflow run it stops is marked KILLED
    and tagged with :attr:`description`.

    Attributes:
        exit_code: ``128 + signal number``, as a shell reports a process a signal ended.
        description: where it stopped, for the MLflow run's tag.
    """

    def __init__(self, what: str, where: str, todo: str, signum: int) -> None:
        super().__init__(what, where, todo)
        self.exit_code = 128 + signum
        self.description = f"{what}; {where}"


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Whether tracebacks are wanted (``--debug`` on the command line or ``CONVPIPE_DEBUG``)."""
    args = sys.argv if argv is None else argv
    return "--debug" in args or os.environ.get("CONVPIPE_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> int:
    """Print ``exc`` as the one-line user error and return the exit code to use."""
    if isinstance(exc, ConvpipeError):
        line = exc.line()
    elif isinstance(exc, KeyboardInterrupt):
        line = "convpipe: error: interrupted by the user"
    else:
        line = f"convpipe: error: {type(exc).__name__}: {exc}"
    print(mask(line), file=sys.stderr, flush=True)
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return exc.exit_code if isinstance(exc, ConvpipeError) else EXIT_USER_ERROR


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The full-disk ``OSError`` (``ENOSPC``/``EDQUOT``) ``exc`` is or was raised from, if any.

    Libraries wrap it (Lightning, MLflow); the chain of causes is walked, each link once.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk or quota."""
    return disk_full_cause(exc) is not None


def disk_full(exc: OSError) -> ConvpipeError:
    """The one-line error for a write that found no space left (``ENOSPC``/``EDQUOT``)."""
    where = f"while writing {exc.filename}" if exc.filename else "while writing the outputs"
    return ConvpipeError(
        f"the disk is full ({os.strerror(exc.errno or errno.ENOSPC)})",
        where,
        "free space there and rerun; the previous outputs were left as they were, and an "
        "interrupted training resumes from its last checkpoint",
    )


def entrypoint(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` so that user errors end the process with one line and exit code 2.

    A full disk is a user error too: outputs are written to temporary paths and renamed
    (:mod:`convpipe.io`), so the previous ones are still in place.

    Unexpected exceptions (bugs) keep their traceback: hiding them would hide the bug. It
    too is printed through the masked standard error (:func:`convpipe.redact.install`).
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        install_masking()  # every line printed from here on has its secrets masked
        try:
            return func(*args, **kwargs)
        except (ConvpipeError, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            raise SystemExit(report(exc)) from None
        except Exception as exc:  # a full disk, however deep a library wrapped it
            cause = disk_full_cause(exc)
            if cause is None or debug_enabled():
                raise
            raise SystemExit(report(disk_full(cause))) from None

    return wrapper

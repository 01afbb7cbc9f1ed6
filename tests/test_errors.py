"""errors: a full disk is found however deep a library wrapped it."""

from __future__ import annotations

import errno

from convpipe.errors import disk_full, disk_full_cause


def _wrapped(inner: BaseException) -> RuntimeError:
    try:
        try:
            raise inner
        except OSError as exc:
            raise RuntimeError("checkpoint save failed") from exc
    except RuntimeError as outer:
        return outer


def test_a_wrapped_enospc_is_found_with_its_file() -> None:
    inner = OSError(errno.ENOSPC, "No space left on device", "checkpoints/last.ckpt")
    cause = disk_full_cause(_wrapped(inner))
    assert cause is inner
    line = disk_full(cause).line()
    assert line.startswith("convpipe: error: the disk is full (No space left on device)")
    assert "while writing checkpoints/last.ckpt" in line


def test_other_errors_and_cycles_are_not_a_full_disk() -> None:
    assert disk_full_cause(_wrapped(OSError(errno.EACCES, "Permission denied"))) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle: each link is visited once
    assert disk_full_cause(a) is None
    assert disk_full_cause(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None

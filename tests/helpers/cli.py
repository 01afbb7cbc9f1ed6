"""The ``convpipe`` command run in-process, its exit code and output captured."""

from __future__ import annotations

import pytest


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``convpipe *argv`` in-process: (exit code, stdout, stderr)."""
    from convpipe.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err

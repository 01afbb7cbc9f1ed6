"""The one function that hides secrets: every text convpipe prints, logs or stores goes through it.

:func:`mask` replaces, anywhere in a text (a URI, an exception message, ``pip freeze``'s
output, a log line, a param, a tag):

- the password of a URL's ``user:password@`` part, parsed the way SQLAlchemy's ``make_url``
  parses it (the password runs up to the first ``@``, so one holding an unencoded ``/``, ``#``
  or ``?`` is still masked whole: ``postgresql+psycopg2://u:Ab/Cd3f@host/db``);
- a bare ``https://TOKEN@host`` user part (how git remotes and pip's editable installs carry
  access tokens);
- the values of secret query keys (``?password=``, ``?token=``, ``&sig=``, AWS signatures) and
  of ``password=`` pairs in libpq connection strings;
- the literal value of every secret-looking environment variable of this process
  (``*PASSWORD*``, ``*TOKEN*``, ``*SECRET*``, ``*_KEY``, ``*CREDENTIAL*``), wherever it appears.

Over-masking is preferred to a leak: ``http://host:8080/p?x=a@b`` reads as a password
``8080/p?x=a`` too (as it does for SQLAlchemy) and is shown as ``http://host:***@b``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

MASK = "***"

# query-string and connection-string keys whose values are secrets
SECRET_KEYS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "access_key",
    "secret_key",
    "client_secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
)

# scheme://user:password@ : the user has no ':', '/' or '@'; the password runs to the first '@'
_USER_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*):(?P<secret>[^\s@'\"<>]+)@"
)

# http(s)://TOKEN@host (also git+https://): a user part alone is how tokens ride in remotes
_TOKEN_USER = re.compile(r"(?P<head>\b(?:git\+)?https?://)(?P<secret>[^\s:/@'\"<>]+)@")

_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:" + "|".join(re.escape(k) for k in SECRET_KEYS) + r")=)"
    r"(?P<secret>[^&#\s'\"<>]+)",
    re.IGNORECASE,
)

# libpq's "host=h password=secret" and PGPASSWORD-style "password: secret" in messages
_PAIR_SECRET = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd)\s*[=:]\s*)(?P<secret>[^\s&'\",;]+)", re.IGNORECASE
)

# environment variable names whose values are secrets
_SECRET_ENV = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|_KEY$|CREDENTIAL", re.IGNORECASE)

# shorter values are too likely to occur by chance in ordinary text
MIN_ENV_SECRET = 6


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of this process's secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    values = {
        value
        for name, value in env.items()
        if _SECRET_ENV.search(name) and len(value) >= MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def mask(text: str) -> str:
    """``text`` with every secret it holds replaced by ``***`` (safe to print, log, store).

    Args:
        text: Any text: a URI, an exception's message, a file's content.

    Returns:
        The same text, secrets masked; unchanged when it holds none.
    """
    if not text:
        return text
    out = _USER_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    out = _TOKEN_USER.sub(lambda m: f"{m.group('head')}{MASK}@", out)
    out = _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, out)
    out = _PAIR_SECRET.sub(lambda m: m.group("head") + MASK, out)
    for secret in environment_secrets():
        out = out.replace(secret, MASK)
    return out


def _masked_record_factory(
    factory: Callable[..., logging.LogRecord],
) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error report
            return record
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    make.convpipe_masked = True  # type: ignore[attr-defined]
    return make


class MaskedStream:
    """A text stream that masks what is written to it before passing it on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """Write ``text`` with its secrets masked; returns the length of ``text``."""
        self._stream.write(mask(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """Write each line masked."""
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> None:
    """Mask everything this process prints: log records, warnings, ``stdout`` and ``stderr``.

    Called once by every entry point (:func:`convpipe.errors.entrypoint`): log records are
    masked when made (whichever handler prints them: convpipe's, MLflow's, Lightning's,
    Optuna's), and the two standard streams are wrapped, so a library's ``print`` of a URL
    with credentials is masked too. Idempotent.
    """
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "convpipe_masked", False):
        logging.setLogRecordFactory(_masked_record_factory(factory))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, MaskedStream(stream))

"""Opening a study's Optuna storage (sqlite, journal file or RDB URL), password never shown."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.redact import mask
from convpipe.tracking.store import store_lock
from convpipe.tuning.objectives import directions, objective_names
from convpipe.tuning.space import make_pruner, make_sampler

SCHEMA_ATTEMPTS = 4


def storage_file(url: str) -> Path | None:
    """The local file behind a journal or sqlite storage URL (None for servers and memory)."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        with contextlib.suppress(Exception):  # a malformed URL is reported by open_storage
            database = make_url(url).database
            if database and database != ":memory:":
                return Path(database)
    return None


def _scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url`` or any other secret (driver messages quote it)."""
    return mask(text.replace(url, mask(url)))


def open_storage(url: str) -> BaseStorage:
    """Optuna storage for ``tune.storage``: ``journal:<file>`` or any SQLAlchemy URL.

    The folder of a journal or sqlite file is created if needed; several workers on one
    sqlite file wait up to a minute for its lock instead of failing at once.

    Raises:
        ConvpipeError: for a URL that is neither, or a database that cannot be opened (the
            message never shows the URL's password).
    """
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = storage_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConvpipeError(
            "tune.storage is not a storage URL",  # not echoed: it may hold a password
            "in params.yaml",
            "use sqlite:///optuna.db, journal:optuna.journal or postgresql://user@host/db",
        )
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}
    try:
        return _rdb_storage(url, engine)
    except Exception as exc:  # sqlalchemy raises many types for bad URLs and dead servers
        first = _scrub(" ".join(str(exc).split()), url)[:200]
        raise ConvpipeError(
            f"cannot open tune.storage ({type(exc).__name__}: {first})",
            f"at {mask(url)}",
            "check the URL, its database driver, and that the server is running",
        ) from None


def _rdb_storage(url: str, engine: dict[str, Any]) -> BaseStorage:
    """RDBStorage, retried while another worker creates the schema of a fresh database."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # "already exists" / "duplicate key": the other worker won the creation race
            if attempt == SCHEMA_ATTEMPTS or (
                "exist" not in str(exc) and "duplicate" not in str(exc)
            ):
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")


def load_study(params: Params) -> optuna.Study:
    """Create or continue the study ``tune.study_name`` in ``tune.storage``.

    Raises:
        ConvpipeError: if the stored study optimises in the other direction.
    """
    tune = params.tune
    # Workers started together on a fresh sqlite file would each create Optuna's schema and
    # one would die ("UNIQUE constraint failed: alembic_version"): on one machine they take
    # turns (a server RDB copes through _rdb_storage's retries; a journal locks itself).
    with (
        store_lock(tune.storage) if tune.storage.startswith("sqlite") else contextlib.nullcontext()
    ):
        study = optuna.create_study(
            study_name=tune.study_name,
            storage=open_storage(tune.storage),
            sampler=make_sampler(tune, params.base.seed),
            pruner=make_pruner(tune),
            directions=directions(params),
            load_if_exists=True,
        )
    names, wanted = objective_names(params), directions(params)
    stored = [d.name.lower() for d in study.directions]
    stored_names = study.metric_names  # None for a study made before objectives had names
    if stored != wanted or (stored_names is not None and list(stored_names) != names):
        made = f" ({', '.join(stored_names)})" if stored_names else ""
        raise ConvpipeError(
            f"study '{tune.study_name}' was created to {' and '.join(stored)}{made}, but "
            f"the objectives ({', '.join(names)}) ask to {' and '.join(wanted)}",
            f"in {mask(tune.storage)}",
            "use a new tune.study_name",
        )
    if stored_names is None:
        with warnings.catch_warnings():  # "experimental since 3.2": the names are what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # the reports and the dashboard show them
    return study

"""A throwaway PostgreSQL server for tests: the ``postgres_url`` session fixture.

Use it from any test module with ``pytest_plugins = ["tests.helpers.pg"]``. The server runs from the
local PostgreSQL binaries (``PATH`` or ``/usr/lib/postgresql/*/bin``) in a temporary data dir,
listens on 127.0.0.1 only (on a free port, unix socket inside the temp dir), and is stopped
with ``pg_ctl stop -m fast`` when the session ends, whatever happened. Local socket
connections are trusted (to create the role and database); TCP connections need the password.

PostgreSQL refuses to run as root, so under root every server command runs as the
``postgres`` OS user (``runuser -u postgres --``).

The tests are skipped when the binaries or the ``psycopg2`` driver are missing, unless
``CONVPIPE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which makes that a failure instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
REQUIRE_ENV = "CONVPIPE_REQUIRE_POSTGRES"
OS_USER = "postgres"
START_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it


class PostgresUnavailable(RuntimeError):
    """The binaries, the driver or the OS user needed to run a server are missing."""


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``PATH`` first, then the newest ``/usr/lib/postgresql/<version>/bin`` (Debian puts the
    server binaries there, outside ``PATH``).

    Raises:
        PostgresUnavailable: if no folder has all three.
    """
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=_version_key, reverse=True)]
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; install them with: apt-get install -y postgresql"
    )


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One server's data dir, port and credentials; ``start``/``stop`` drive ``pg_ctl``."""

    bindir: Path
    root: Path
    user: str = "convpipe"
    password: str = ""
    database: str = "convpipe_test"
    port: int = 0

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def log(self) -> Path:
        """The server log (its tail is shown when the server does not start)."""
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database, over TCP with the password."""
        return self.url_of(self.database)

    def command(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the ``postgres`` OS user when we are root.

        Raises:
            RuntimeError: with the command's output (and the server log) if it fails.
        """
        cmd = [str(self.bindir / name), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        proc = subprocess.run(
            cmd, cwd=self.root, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{name} {' '.join(args)} exited {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}\n--- server log ---\n{log}"
            )
        return proc

    def init(self) -> None:
        """Create the cluster: local socket trusted, TCP with a scram password."""
        self.command(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            OS_USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-locale",
            "--encoding=UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start on a free port, retrying with another if that port was taken meanwhile."""
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            self._write_conf()
            try:
                self.command("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start")
                return
            except RuntimeError:
                if attempt == START_ATTEMPTS - 1:
                    raise

    def _write_conf(self) -> None:
        # postgresql.auto.conf is read last: these settings win over postgresql.conf.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "40",
            # a test database does not need to survive a power cut
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.data / "postgresql.auto.conf").write_text(text)

    def create_database(self, name: str | None = None) -> str:
        """Create the login role (with its password) once, and a database it owns.

        Args:
            name: The database; :attr:`database` when omitted.

        Returns:
            The URL of that database (as :attr:`url`).
        """
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(
            host=str(self.root), port=self.port, user=OS_USER, dbname="postgres"
        )
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,))
                if cur.fetchone() is None:
                    cur.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                            sql.Identifier(self.user), sql.Literal(self.password)
                        )
                    )
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name or self.database), sql.Identifier(self.user)
                    )
                )
        finally:
            conn.close()
        return self.url_of(name or self.database)

    def url_of(self, database: str, driver: str = "psycopg2", password: bool = True) -> str:
        """SQLAlchemy URL of ``database`` over TCP.

        Args:
            database: The database name.
            driver: ``psycopg2`` (``postgresql+psycopg2://``) or ``""`` for the plain
                ``postgresql://`` form (psycopg 3 under SQLAlchemy 2.1).
            password: Whether the URL carries the password (else libpq finds it in
                ``PGPASSWORD`` or the password file).
        """
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        secret = f":{self.password}" if password else ""
        return f"{scheme}://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Stop the server if it runs (fast mode: roll back open sessions, then exit)."""
        if (self.data / "postmaster.pid").exists():
            self.command("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def check_available() -> Path:
    """The server binaries' folder, once the driver and (under root) OS user are known present.

    Raises:
        PostgresUnavailable: saying what is missing and how to get it.
    """
    bindir = find_bindir()
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "the psycopg2 driver is not installed: pip install -e '.[dev]'"
        ) from None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root and there is no '{OS_USER}' OS user to run the server as"
            ) from None
    return bindir


@contextlib.contextmanager
def running_postgres(bindir: Path) -> Iterator[PostgresServer]:
    """A started server with its role and database; stopped and deleted on exit.

    Args:
        bindir: folder with ``initdb``, ``pg_ctl`` and ``postgres`` (see :func:`find_bindir`).

    Yields:
        The running server; ``server.url`` is the SQLAlchemy URL to use.
    """
    # Not under pytest's tmp_path: its parents are root-only, and the postgres user must
    # reach the data dir. A short path also keeps the unix socket under its 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="convpipe-pg-"))
    # A distinctive password, so a leak into any output or file is found by a plain search.
    server = PostgresServer(bindir, root, password=f"pw{secrets.token_hex(12)}")
    try:
        if os.geteuid() == 0:
            account = pwd.getpwnam(OS_USER)
            os.chown(root, account.pw_uid, account.pw_gid)
        server.init()
        server.start()
        server.create_database()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session (skips if none can be run)."""
    try:
        bindir = check_available()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"PostgreSQL required ({REQUIRE_ENV}=1) but unavailable: {exc}")
        pytest.skip(f"no PostgreSQL server for this test: {exc}")
    with running_postgres(bindir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg2://user:password@127.0.0.1:port/db`` of the throwaway server."""
    return postgres_server.url

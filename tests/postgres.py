"""A real PostgreSQL (Debian package ``postgresql``) for the tests: ``initdb`` in a temp
folder, ``pg_ctl`` on a free loopback port, stopped by PID.

The packaged service (``/etc/postgresql``, ``/var/lib/postgresql``) is never touched:
each server is its own cluster, listening on 127.0.0.1 only with its Unix socket in its
own folder. PostgreSQL refuses to run as root, so as root it runs as ``nobody`` in a
folder made that user's.

The suite's PostgreSQL mode (``RADPIPE_TEST_JOURNAL=postgresql``, ``make test-postgresql``)
gives every node the tests configure a journal of its own in PostgreSQL: one server for
the session, started by the first test that needs it, and a fresh database per journal
(:func:`suite_journal_url`), so that tests stay as isolated as with their own SQLite file.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import psycopg
import pytest

USER = "nobody"  # who runs the server when the tests run as root
# The journal the suite's nodes use: "sqlite" (the default, as in CI) or "postgresql".
JOURNAL_MODES = ("sqlite", "postgresql")
JOURNAL_MODE = os.environ.get("RADPIPE_TEST_JOURNAL", "sqlite")


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster: ``start()``, ``stop()`` (fast shutdown, as an operator's ``pg_ctl stop
    -m fast``), ``kill()`` (by PID, at the end), and a fresh database per test."""

    def __init__(self, port: int | None = None) -> None:
        binaries = postgres_bin()
        if binaries is None:
            pytest.fail("PostgreSQL not installed: run `make test`, which installs the Debian package postgresql")
        self.bin = binaries
        self.port = port or _free_port()
        # Not under pytest's basetemp: that is root's and closed to other users.
        self.dir = Path(tempfile.mkdtemp(prefix="radpipe-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(USER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", USER, "--"]
        self._databases = count(1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*self._as, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if out.returncode != 0:
            raise AssertionError(f"{tool} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir}"
            # A test server: durable against a crash of the server, not of the machine.
            " -c fsync=off -c full_page_writes=off -c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, what was committed stays."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def kill(self) -> None:
        """Stop the server by its PID (fast shutdown: SIGINT) and remove its folder."""
        pid = self.pid
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"radpipe_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


_session_server: PostgresServer | None = None


def session_server() -> PostgresServer:
    """The session's PostgreSQL, running: started on first use (a run of the default mode
    that selects no PostgreSQL test starts none), stopped by :func:`session_server_stopped`."""
    global _session_server
    if _session_server is None:
        _session_server = PostgresServer()  # kept before it starts: a half-started one is killed too
        _session_server.start()
    return _session_server


def suite_journal_url() -> str | None:
    """In the PostgreSQL mode, a fresh database's URL for one node's (or one test's)
    journal; None in the SQLite mode, where each has its SQLite file."""
    return session_server().create_database() if JOURNAL_MODE == "postgresql" else None


@pytest.fixture(scope="session", autouse=True)
def session_server_stopped() -> Iterator[None]:
    """The session's PostgreSQL, if a test started it, is stopped at the session's end."""
    yield
    if _session_server is not None:
        _session_server.kill()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The session's PostgreSQL, running."""
    return session_server()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database of the session's PostgreSQL."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of this test's own, not started: for tests that stop and start it."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.kill()

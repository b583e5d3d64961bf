"""Real backing services for the test suite (a pytest plugin).

Register it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.services"]``.

The durability and locking behaviour we test only exists in a real PostgreSQL, so this module
starts a private, throw-away server for the test session instead of mocking one, and never
touches any server that may already be running on this machine (e.g. on port 5432).

Environment:

* ``TICKETGATE_TEST_POSTGRES_URL``: use this server instead of starting one.
* ``TICKETGATE_REQUIRE_SERVICES=1`` (set by CI): a service that cannot be provided fails the
  tests that need it instead of skipping them, so CI can never go green by testing nothing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

PG_USER = "tg"
PG_DATABASE = "ticketgate"
PG_SYSTEM_USER = "postgres"
READY_TIMEOUT_S = 60.0


@contextmanager
def _uncaptured(config: pytest.Config) -> Iterator[None]:
    """Let progress messages (an apt-get install can take a minute) reach the terminal."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
    else:
        with capman.global_and_fixture_disabled():
            yield


def _say(config: pytest.Config, message: str) -> None:
    with _uncaptured(config):
        print(f"[tests.services] {message}", flush=True)


def _unavailable(config: pytest.Config, reason: str) -> NoReturn:
    """Skip locally, but fail under TICKETGATE_REQUIRE_SERVICES=1 so CI never skips silently."""
    _say(config, reason)
    if os.environ.get("TICKETGATE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (TICKETGATE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _find_pg_bindir() -> Path | None:
    """Highest PostgreSQL version installed the Debian way (/usr/lib/postgresql/N/bin)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "pg_ctl").exists() and version.replace(".", "").isdigit():
            found.append((tuple(int(part) for part in version.split(".")), bindir))
    return max(found)[1] if found else None


def _apt_has_candidate(package: str) -> bool:
    """True if apt's package lists already know ``package`` (else ``apt-get update`` is needed)."""
    policy = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    return any(
        line.strip().startswith("Candidate:") and "(none)" not in line
        for line in policy.splitlines()
    )


def _apt_install(config: pytest.Config, packages: Sequence[str]) -> bool:
    """Install Debian packages; ``apt-get update`` only if the lists lack them or are stale."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = ["apt-get", "update"]
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]

    def run(cmd: list[str]) -> bool:
        _say(config, "running: " + " ".join(cmd))
        with _uncaptured(config):
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=False)
        return proc.returncode == 0

    if all(_apt_has_candidate(p) for p in packages) and run(install):
        return True
    # Lists missing or stale (an old version that is gone from the mirror): refresh and retry.
    return run(update) and run(install)


def _ensure_pg_bindir(config: pytest.Config) -> Path:
    bindir = _find_pg_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(
            config,
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
            "install them with: apt-get install postgresql",
        )
    _say(config, "PostgreSQL server binaries not found; installing the Debian package")
    if not _apt_install(config, ["postgresql"]):
        _unavailable(config, "apt-get install postgresql failed")
    bindir = _find_pg_bindir()
    if bindir is None:
        _unavailable(config, "postgresql installed but no /usr/lib/postgresql/*/bin/initdb")
    return bindir


def _ensure_system_user(name: str) -> None:
    """PostgreSQL refuses to run as root, so when we are root it runs as this user."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )


def _free_port() -> int:
    """A port the kernel says is free now (racy, hence the retries in the caller)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conninfo(url: str) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://...``) to a libpq URL psycopg accepts."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _LocalPostgres:
    """One private cluster in a temp dir: initdb, start on a free loopback port, stop, remove."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # When root, the dir must be reachable by the postgres user: /tmp is, while a
        # root-private TMPDIR (or pytest's /tmp/pytest-of-root) is not.
        parent = "/tmp" if self.as_root else None
        self.base = Path(tempfile.mkdtemp(prefix="ticketgate-pg-", dir=parent))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "server.log"
        self.port = 0

    def prepare(self) -> None:
        self.sockdir.mkdir()
        if self.as_root:
            _ensure_system_user(PG_SYSTEM_USER)
            for path in (self.base, self.sockdir):
                shutil.chown(path, user=PG_SYSTEM_USER, group=PG_SYSTEM_USER)

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        argv = list(cmd)
        if self.as_root:
            argv = ["runuser", "-u", PG_SYSTEM_USER, "--", *argv]
        proc = subprocess.run(
            argv,
            cwd=self.base,  # the caller's cwd may be unreadable for the postgres user
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                f"{self._log_tail()}"
            )
        return proc

    def _log_tail(self) -> str:
        try:
            return "\nserver log (tail):\n" + self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def initdb(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-A", "trust",
            "-U", PG_USER,
            "--encoding=UTF8",
            "--no-locale",  # deterministic collation, independent of the machine's locales
        )  # fmt: skip

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; retry with another port if one was taken in the meantime."""
        for attempt in range(1, attempts + 1):
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c unix_socket_directories={self.sockdir} "
                "-c shared_buffers=64MB"  # fsync stays at its default (on): we test durability
            )
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "start", "-w", "-t", str(int(READY_TIMEOUT_S)),
                    "-D", str(self.datadir),
                    "-l", str(self.logfile),
                    "-o", options,
                )  # fmt: skip
                break
            except RuntimeError:
                if attempt == attempts:
                    raise
        self._wait_ready()

    def _wait_ready(self) -> None:
        """pg_ctl -w already waited; confirm that TCP logins work before handing out the URL."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.admin_conninfo("postgres"), connect_timeout=5):
                    return
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    message = "PostgreSQL did not accept connections" + self._log_tail()
                    raise RuntimeError(message) from err
                time.sleep(0.2)

    def admin_conninfo(self, dbname: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        if self.port and (self.datadir / "postmaster.pid").exists():
            pg_ctl = str(self.bindir / "pg_ctl")
            self._run(pg_ctl, "stop", "-w", "-m", "fast", "-D", str(self.datadir))

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """SQLAlchemy URL of a real PostgreSQL (``postgresql+psycopg://tg@127.0.0.1:PORT/ticketgate``).

    The server is started for this session only and stopped and deleted at its end.
    """
    external = os.environ.get("TICKETGATE_TEST_POSTGRES_URL")
    if external:
        yield external
        return

    server = _LocalPostgres(_ensure_pg_bindir(pytestconfig))
    try:
        server.prepare()
        server.initdb()
        server.start()
        with psycopg.connect(server.admin_conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
        _say(pytestconfig, f"PostgreSQL ({server.bindir.parent.name}) on 127.0.0.1:{server.port}")
        yield server.url(PG_DATABASE)
    finally:
        try:
            server.stop()
        finally:
            server.remove()


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the session's server for one test, dropped afterwards.

    Tests get isolation (own schema, own migrations) without paying for a server per test.
    """
    name = f"tg_test_{uuid.uuid4().hex[:16]}"
    admin = _conninfo(postgres_url)  # CREATE/DROP DATABASE run from the session database
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

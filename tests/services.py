"""Real backing services for the test suite (a pytest plugin).

Register it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.services"]``.

The durability and locking behaviour we test only exists in a real PostgreSQL, so this module
starts a private, throw-away server for the test session instead of mocking one, and never
touches any server that may already be running on this machine (e.g. on port 5432).  The same
goes for the Celery broker: a private Redis (``redis_server``) on a free loopback port, never the
one a developer may run on 6379, and a private RabbitMQ node (``rabbitmq_server``) with its own
epmd, never the machine's ``rabbit@localhost`` on 5672.

Environment:

* ``TICKETGATE_TEST_POSTGRES_URL``: use this server instead of starting one.
* ``TICKETGATE_REQUIRE_SERVICES=1`` (set by CI): a service that cannot be provided fails the
  tests that need it instead of skipping them, so CI can never go green by testing nothing.
"""

from __future__ import annotations

import base64
import glob
import grp
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, suppress
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
REDIS_BINARY = "redis-server"
RABBITMQ_BINDIR = Path("/usr/lib/rabbitmq/bin")  # Debian's real scripts (not the su wrappers)


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


# --- Redis (the Celery broker) ----------------------------------------------------------------


def _ensure_redis_binary(config: pytest.Config) -> str:
    found = shutil.which(REDIS_BINARY) or shutil.which(f"/usr/bin/{REDIS_BINARY}")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(
            config,
            "redis-server not found; install it with: apt-get install redis-server",
        )
    _say(config, "redis-server not found; installing the Debian package")
    if not _apt_install(config, ["redis-server"]):
        _unavailable(config, "apt-get install redis-server failed")
    found = shutil.which(REDIS_BINARY) or shutil.which(f"/usr/bin/{REDIS_BINARY}")
    if not found:
        _unavailable(config, "redis-server installed but not found on PATH")
    return found


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    """True if a Redis on 127.0.0.1:port answers PING (no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private, memory-only Redis on a free loopback port (what ``redis_server`` yields).

    ``url`` stays the same for the whole session: :meth:`restart` stops the server and starts it
    again on the same port, with an empty dataset (no persistence: ``--save "" --appendonly no``),
    which is exactly what a broker restart without persistence does to queued tasks.
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.base = Path(tempfile.mkdtemp(prefix="ticketgate-redis-"))
        self.logfile = self.base / "redis.log"
        self.port = 0
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> bool:
        """Start on ``self.port``; False if the server died (port taken) instead of answering."""
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.base),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            argv,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it mid-test
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _redis_ping(self.port):
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING" + self._log_tail())

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; retry with another port if one was taken in the meantime."""
        for _attempt in range(attempts):
            self.port = _free_port()
            if self._spawn():
                return
        raise RuntimeError("redis-server failed to start" + self._log_tail())

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until its port is closed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port; everything stored is gone."""
        port = self.port
        self.stop()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._spawn():  # the old socket may linger for a moment
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server could not restart on port {port}"
                                   + self._log_tail())
            time.sleep(0.2)
        self.restarts += 1

    def ensure_running(self) -> None:
        """Start it again (same port, same ``url``) if an earlier test stopped it."""
        if not self.running:
            self.restart()

    def _log_tail(self) -> str:
        try:
            return "\nredis log (tail):\n" + self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """A private Redis for this session: ``.url`` (``redis://127.0.0.1:PORT/0``), ``.restart()``
    (same port, data lost) and ``.stop()``.  Stopped and deleted at the end of the session.

    The server is shared by the whole session; a test that stops it leaves it stopped, so tests
    call :meth:`RedisServer.ensure_running` first (the ``redis_url`` fixture does).
    """
    server = RedisServer(_ensure_redis_binary(pytestconfig))
    try:
        server.start()
        _say(pytestconfig, f"Redis on 127.0.0.1:{server.port}")
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.remove()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, (re)started if an earlier test left it stopped."""
    redis_server.ensure_running()
    return redis_server.url


# --- Dovecot (the IMAP server) ----------------------------------------------------------------

DOVECOT_BINARY = "/usr/sbin/dovecot"
DOVECOT_IMAP = "/usr/lib/dovecot/imap"
DOVECOT_INTERNAL_USER = "dovecot"  # created by Debian's dovecot-core
DOVECOT_LOGIN_USER = "dovenull"
DOVECOT_MAIL_USER = "nobody"  # owns the test maildirs (Dovecot never runs mail as root)
LEGACY_ADDRESS = "127.0.0.2"  # Linux routes all of 127/8 to lo
NO_TLS_ADDRESS = "127.0.0.3"


def _ensure_dovecot(config: pytest.Config) -> None:
    if Path(DOVECOT_BINARY).exists() and Path(DOVECOT_IMAP).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(config, "Dovecot not found; install it with: apt-get install dovecot-imapd")
    _say(config, "Dovecot not found; installing the Debian package")
    if not _apt_install(config, ["dovecot-imapd"]):
        _unavailable(config, "apt-get install dovecot-imapd failed")
    if not (Path(DOVECOT_BINARY).exists() and Path(DOVECOT_IMAP).exists()):
        _unavailable(config, f"dovecot-imapd installed but {DOVECOT_IMAP} is missing")


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def make_test_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1, 127.0.0.2 and localhost.

    Returns ``(ca_cert, server_cert, server_key)``; the CA cert is what a client's ``ca_file``
    must contain to trust the server.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = (directory / f"{name}.key", directory / f"{name}.csr",
                      directory / f"{name}.pem")
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
             "-subj", f"/CN=ticketgate test CA {name}")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_cert, cert, key


class DovecotServer:
    """A private Dovecot in a temp dir (what the ``dovecot`` fixture yields).

    * IMAPS (implicit TLS) on ``imaps_port`` and IMAP with STARTTLS on ``imap_port``, both on
      127.0.0.1 only, with a certificate signed by a CA made for this session (``ca_file``);
      ``other_ca_file`` is an unrelated CA, for "certificate not trusted" tests.
    * IMAPS on ``LEGACY_ADDRESS:legacy_port`` announcing neither MOVE nor UIDPLUS, for the
      COPY + \\Deleted + EXPUNGE paths of clients.
    * IMAP on ``NO_TLS_ADDRESS:no_tls_port`` offering no STARTTLS (a stripped capability list).
    * Users in passwd-files, one per user (:meth:`add_user`, :meth:`set_password`), mail in
      Maildirs under the temp dir.
    * Run as root, Dovecot's own processes use the unprivileged ``dovecot``/``dovenull`` users
      and mail is owned by ``nobody``; run as another user, everything runs as that user.
    """

    def __init__(self) -> None:
        self.as_root = os.geteuid() == 0
        # The mail user must be able to reach its maildir: /tmp, not a root-private TMPDIR.
        self.base = Path(tempfile.mkdtemp(prefix="ticketgate-dovecot-",
                                          dir="/tmp" if self.as_root else None))
        self.base.chmod(0o755)
        self.config_file = self.base / "dovecot.conf"
        self.users_dir = self.base / "users"
        self.logfile = self.base / "dovecot.log"
        self.maildir = self.base / "mail"
        self.instance = f"tg-{self.base.name[-8:]}"
        self.imap_port = 0
        self.imaps_port = 0
        self.legacy_port = 0  # IMAPS on LEGACY_ADDRESS, without MOVE and UIDPLUS
        self.no_tls_port = 0  # IMAP on NO_TLS_ADDRESS, no STARTTLS offered
        self._proc: subprocess.Popen[bytes] | None = None
        certs = self.base / "certs"
        self.ca_file, self.cert_file, self.key_file = make_test_ca(certs, "server")
        self.other_ca_file = make_test_ca(certs, "other")[0]
        if self.as_root:
            mail = pwd.getpwnam(DOVECOT_MAIL_USER)
            internal, login = DOVECOT_INTERNAL_USER, DOVECOT_LOGIN_USER
            internal_group = DOVECOT_INTERNAL_USER
        else:
            mail = pwd.getpwuid(os.geteuid())
            internal = login = mail.pw_name
            internal_group = grp.getgrgid(mail.pw_gid).gr_name
        self._uid, self._gid = mail.pw_uid, mail.pw_gid
        self._internal_user, self._login_user = internal, login
        self._internal_group = internal_group
        self.maildir.mkdir()
        os.chown(self.maildir, self._uid, self._gid)
        self.users_dir.mkdir()

    def add_user(self, name: str, password: str) -> None:
        """One passwd-file per user: Dovecot opens a new user's file at the first login, while
        a change to a file it already read is noticed only seconds later."""
        line = f"{name}:{{PLAIN}}{password}:{self._uid}:{self._gid}::{self.maildir / name}::\n"
        target = self.users_dir / name
        tmp = target.with_suffix(".tmp")
        tmp.write_text(line)
        tmp.chmod(0o644)
        tmp.replace(target)  # atomic: Dovecot never reads half a file

    def wait_for_login(self, name: str, password: str, timeout: float = 10.0) -> None:
        """Block until Dovecot accepts the login: it looks at the passwd-file at most once a
        second, so a user added a moment ago may not be known yet."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        credentials = f"\0{name}\0{password}".encode()
        deadline = time.monotonic() + timeout
        while True:
            with socket.create_connection(("127.0.0.1", self.imaps_port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                reader = sock.makefile("rb")
                reader.readline()  # greeting
                sock.sendall(b"a AUTHENTICATE PLAIN " + base64.b64encode(credentials) + b"\r\n")
                answer = reader.readline()
                sock.sendall(b"b LOGOUT\r\n")
            if answer.startswith(b"a OK"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dovecot does not accept {name}: {answer!r}")
            time.sleep(0.2)

    def _write_config(self) -> None:
        b = self.base
        (b / "run").mkdir(exist_ok=True)
        (b / "state").mkdir(exist_ok=True)
        self.config_file.write_text(f"""\
# Written by tests/services.py for one test session.
instance_name = {self.instance}
base_dir = {b}/run
state_dir = {b}/state
protocols = imap
listen = 127.0.0.1, {LEGACY_ADDRESS}, {NO_TLS_ADDRESS}
log_path = {self.logfile}
verbose_proctitle = yes
default_internal_user = {self._internal_user}
default_internal_group = {self._internal_group}
default_login_user = {self._login_user}
first_valid_uid = {min(self._uid, 500)}
ssl = required
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login xoauth2
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {self.users_dir}/%n
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {self.users_dir}/%n
}}
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 50
service imap-login {{
  {"" if self.as_root else "chroot ="}
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
  inet_listener imaps_legacy {{
    address = {LEGACY_ADDRESS}
    port = {self.legacy_port}
    ssl = yes
  }}
  inet_listener imap_no_tls {{
    address = {NO_TLS_ADDRESS}
    port = {self.no_tls_port}
  }}
}}
# A server that offers no STARTTLS (what a man in the middle makes of any server).
local {NO_TLS_ADDRESS} {{
  ssl = no
}}
# A server without MOVE and UIDPLUS (they are younger than many IMAP servers in use).
local {LEGACY_ADDRESS} {{
  protocol imap {{
    imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE CHILDREN
  }}
}}
service anvil {{
  chroot =
  # No auth penalty (up to 15 s per failed login from an IP): tests fail logins on purpose.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, attempts: int = 3) -> None:
        """Start on free ports; retry with others if one was taken in the meantime."""
        for _attempt in range(attempts):
            ports = {_free_port() for _ in range(4)}
            if len(ports) < 4:
                continue
            self.imap_port, self.imaps_port, self.legacy_port, self.no_tls_port = sorted(ports)
            self._write_config()
            self._proc = subprocess.Popen(
                [DOVECOT_BINARY, "-c", str(self.config_file), "-F"],
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(self.base / "stderr.log", "ab"),  # noqa: SIM115 - the child owns it
                start_new_session=True,  # a Ctrl-C in the terminal must not kill it mid-test
            )
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and self._proc.poll() is None:
                if all(_port_open(p) for p in (self.imap_port, self.imaps_port)) and \
                        _port_open(self.legacy_port, LEGACY_ADDRESS) and \
                        _port_open(self.no_tls_port, NO_TLS_ADDRESS):
                    return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("dovecot failed to start" + self._log_tail())

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def imap_processes(self, user: str | None = None) -> list[int]:
        """Pids of this instance's ``imap`` processes (one per logged-in session), by user."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            # verbose_proctitle: "dovecot-<instance>/imap [<user> <ip> <command>]"
            if ppid != self.pid or f"{self.instance}/imap [" not in title:
                continue
            if user is None or f"[{user} " in title:
                found.append(int(entry.name))
        return found

    def kill_sessions(self, user: str) -> int:
        """SIGKILL the user's imap processes: their clients see the connection drop."""
        pids = self.imap_processes(user)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def _log_tail(self) -> str:
        text = ""
        for name in ("dovecot.log", "stderr.log"):
            with suppress(OSError):
                text += f"\n{name} (tail):\n" + (self.base / name).read_text(
                    errors="replace")[-3000:]
        return text

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def dovecot(pytestconfig: pytest.Config) -> Iterator[DovecotServer]:
    """A private Dovecot for this session (see :class:`DovecotServer`): ``.imaps_port``,
    ``.imap_port`` (STARTTLS), ``.ca_file``, ``.add_user()``, ``.kill_sessions()``.
    Stopped and deleted at the end of the session."""
    _ensure_dovecot(pytestconfig)
    try:
        server = DovecotServer()
    except (OSError, KeyError, RuntimeError) as exc:
        _unavailable(pytestconfig, f"cannot prepare Dovecot: {exc}")
    try:
        server.start()
        _say(pytestconfig, f"Dovecot on 127.0.0.1:{server.imaps_port} (imaps) and "
                           f":{server.imap_port} (STARTTLS)")
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.remove()


@pytest.fixture
def imap_user(dovecot: DovecotServer) -> tuple[str, str]:
    """A fresh user (own, empty Maildir) on the session's Dovecot: ``(name, password)``."""
    name = f"u{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    dovecot.add_user(name, password)
    dovecot.wait_for_login(name, password)
    return name, password


# --- RabbitMQ (the AMQP broker) ---------------------------------------------------------------


def _find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    return candidates[-1] if candidates else None


def _ensure_rabbitmq(config: pytest.Config) -> tuple[Path, str]:
    """Debian's rabbitmq-server scripts and epmd, installed with apt-get if missing."""

    def found() -> tuple[Path, str] | None:
        epmd = _find_epmd()
        if (RABBITMQ_BINDIR / "rabbitmq-server").exists() and epmd:
            return RABBITMQ_BINDIR, epmd
        return None

    result = found()
    if result is not None:
        return result
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(
            config,
            f"RabbitMQ not found ({RABBITMQ_BINDIR}/rabbitmq-server); install it with: "
            "apt-get install rabbitmq-server",
        )
    _say(config, "RabbitMQ not found; installing the Debian package")
    if not _apt_install(config, ["rabbitmq-server"]):
        _unavailable(config, "apt-get install rabbitmq-server failed")
    result = found()
    if result is None:
        _unavailable(config, f"rabbitmq-server installed but {RABBITMQ_BINDIR} or epmd missing")
    return result


class RabbitMQServer:
    """A private RabbitMQ node (what ``rabbitmq_server`` yields).

    Everything is its own: a temp dir for Mnesia, logs, configuration and the Erlang cookie
    (``HOME``), an epmd on a free port (so no epmd daemon outlives the tests and the machine's
    own node is never seen), a node name ``tg-test-<random>@localhost``, and free AMQP and
    distribution ports on 127.0.0.1.  Nothing is read from /etc/rabbitmq.
    """

    def __init__(self, bindir: Path, epmd: str) -> None:
        self.bindir = bindir
        self.epmd = epmd
        self.base = Path(tempfile.mkdtemp(prefix="ticketgate-rabbitmq-"))
        self.node = f"tg-test-{uuid.uuid4().hex[:10]}@localhost"
        self.logfile = self.base / "server.log"
        self.port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self._epmd: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def prepare(self) -> None:
        self.port, self.dist_port, self.epmd_port = _free_port(), _free_port(), _free_port()
        (self.base / "home").mkdir()
        cookie = self.base / "home" / ".erlang.cookie"  # shared by server and rabbitmqctl
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"  # guest/guest, from 127.0.0.1 only
        )

    def env(self) -> dict[str, str]:
        base = str(self.base)
        return {
            **os.environ,
            "HOME": f"{base}/home",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{base}/log",
            "RABBITMQ_LOGS": "-",  # to stdout, i.e. our log file
            "RABBITMQ_PID_FILE": f"{base}/rabbit.pid",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
            "RABBITMQ_CONF_ENV_FILE": f"{base}/rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{base}/advanced.config",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self) -> None:
        env = self.env()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                [self.epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=env, cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        with self.logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.bindir / "rabbitmq-server")],
                env=env, cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() signals the whole node
            )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self) -> None:
        """``rabbitmqctl await_startup`` fails at once until the node has registered with
        epmd, so retry it until the broker is up (typically 5-10 s)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited {self._proc.returncode}"
                                   + self._log_tail())
            try:
                proc = self.ctl("await_startup", "--timeout", "10", timeout=20)
            except subprocess.TimeoutExpired:
                proc = None
            if proc is not None and proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                out = proc.stdout + proc.stderr if proc is not None else "(timed out)"
                self.stop()
                raise RuntimeError(f"RabbitMQ node {self.node} did not start:\n{out}"
                                   + self._log_tail())
            time.sleep(0.5)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node."""
        return subprocess.run(
            [str(self.bindir / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env(), cwd=self.base, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the node (SIGTERM to its process group: Erlang shuts down cleanly), then epmd."""
        for proc in (self._proc, self._epmd):
            if proc is None:
                continue
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with suppress(ProcessLookupError):  # stragglers: erl_child_setup, inet_gethost
                os.killpg(proc.pid, signal.SIGKILL)
        self._proc = self._epmd = None

    def _log_tail(self) -> str:
        try:
            return "\nrabbitmq log (tail):\n" + self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq_server(pytestconfig: pytest.Config) -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node for this session: ``.url``
    (``amqp://guest:guest@127.0.0.1:PORT//``), ``.ctl(...)`` (rabbitmqctl) and ``.stop()``.
    Stopped and deleted at the end of the session."""
    bindir, epmd = _ensure_rabbitmq(pytestconfig)
    server = RabbitMQServer(bindir, epmd)
    try:
        server.prepare()
        started = time.monotonic()
        server.start()
        _say(pytestconfig, f"RabbitMQ node {server.node} on 127.0.0.1:{server.port} "
                           f"(started in {time.monotonic() - started:.1f}s)")
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.remove()

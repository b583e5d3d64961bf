"""The SMTP listener over real sockets (design.md §2, §3.1, §3.5, §4).

Every test talks SMTP to a real ``ticketgate smtp`` subprocess; mails become tickets in a real
``ticketgate worker --pool solo`` subprocess.  Each "site" is its own temp directory with a TOML
configuration, a SQLite database and the embedded broker (kombu's SQLAlchemy transport on a
SQLite file, because ``TICKETGATE_BROKER_URL`` is removed from the children's environment).
All sites start in parallel once per module; tests that need special limits use their own site.

smtplib is used for ordinary conversations, raw sockets where smtplib would hide what happens on
the wire (pipelining, bare LF, dropped connections, junk, plaintext injection before TLS).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 60.0  # cold interpreter start of several roles at once on a small machine
RESULT_TIMEOUT_S = 60.0
HOSTNAME = "mx.ticketgate.test"
HELO = "client.example.net"
MAIN_MAX_BYTES = 30 * 1024 * 1024
LIMITS_MAX_BYTES = 50_000
LIMITS_TIMEOUT_S = 2.0
DBFAIL_FSIZE_LIMIT = 4 * 1024 * 1024  # bytes one file of the dbfail listener may grow to
FINAL_STATES = {"created", "appended", "duplicate", "ignored", "rejected", "quarantined"}

CONFIG = """
[service]
data_dir = "{data_dir}"
max_message_bytes = {max_bytes}

[smtp]
hostname = "{hostname}"
{smtp}

[[associate]]
name = "sarah"
full_name = "Sarah Johnson"
email = "sarah@example.com"

[[category]]
name = "Technical Support"
[[category]]
name = "Billing"
[[priority]]
name = "Medium"

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com", "help@example.com", "støtte@example.com"]
category = "Technical Support"
priority = "Medium"
owner = "sarah"

[[mailbox]]
id = 2
name = "Billing"
addresses = ["billing@example.com"]
category = "Billing"
priority = "Medium"
owner = "sarah"
"""


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """The test runner's environment without any TICKETGATE_* (so: the config file decides,
    and the broker is the embedded one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One ``python -m workers.cli ROLE ...`` in its own session (a stop reaches its whole
    process group), output in a log file."""

    def __init__(self, args: list[str], cwd: Path, log: Path,
                 preexec: Callable[[], None] | None = None) -> None:
        self.args = args
        self.log = log
        self._out = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args], cwd=cwd, env=child_env(),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=preexec,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return f"--- {' '.join(self.args[:1])} log ({self.log}) ---\n{text[-chars:]}"

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, grace: float = 15.0) -> None:
        self.terminate()
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):  # anything left in the group
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._out.close()


@dataclass
class Site:
    """One ticketgate installation: config, database, SMTP listener, optional worker."""

    name: str
    root: Path
    config: Path
    db_path: Path
    port: int
    smtp: Proc
    workers: list[Proc] = field(default_factory=list)
    tls_cert: Path | None = None

    def start_worker(self) -> Proc:
        proc = Proc(["worker", "--config", str(self.config), "--pool", "solo",
                     "--concurrency", "1"], self.root, self.root / "worker.log")
        self.workers.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in [self.smtp, *self.workers])

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def count(self, sql: str, *args: Any) -> int:
        return int(self.query(sql, *args)[0][0])

    def inbound(self, inbound_id: int) -> dict[str, Any]:
        con = sqlite3.connect(self.db_path, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            row = con.execute("SELECT * FROM inbound_mails WHERE id = ?", (inbound_id,)).fetchone()
        finally:
            con.close()
        assert row is not None, f"inbound {inbound_id} is not stored"
        return dict(row)

    def wait_final(self, ids: list[int], timeout: float = RESULT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll until every record left ``received`` (a worker processed it)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [self.inbound(i) for i in ids]
            if all(r["state"] in FINAL_STATES for r in rows):
                return rows
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: inbound {ids} not processed within {timeout}s: "
                            f"{[r['state'] for r in rows]}\n{self.logs()}")
            time.sleep(0.2)


def write_config(root: Path, smtp: str = "", max_bytes: int = MAIN_MAX_BYTES) -> Path:
    if "greeting_delay" not in smtp:  # the 1 s default would slow every connection down
        smtp = f"greeting_delay = 0\n{smtp}"
    config = root / "ticketgate.toml"
    config.write_text(CONFIG.format(data_dir=(root / "data").as_posix(), max_bytes=max_bytes,
                                    hostname=HOSTNAME, smtp=smtp), encoding="utf-8")
    return config


def start_site(root: Path, name: str, smtp: str = "", max_bytes: int = MAIN_MAX_BYTES,
               preexec: Callable[[], None] | None = None) -> Site:
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, smtp, max_bytes)
    port = free_port()
    proc = Proc(["smtp", "--config", str(config), "--port", str(port)], root,
                root / "smtp.log", preexec)
    return Site(name, root, config, root / "data" / "ticketgate.db", port, proc)


def wait_listening(site: Site, timeout: float = READY_TIMEOUT_S) -> None:
    """Ready = a connection gets the 220 greeting."""
    deadline = time.monotonic() + timeout
    while True:
        if not site.smtp.alive():
            pytest.fail(f"{site.name}: smtp exited with {site.smtp.popen.returncode}\n"
                        f"{site.smtp.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", site.port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{site.name}: smtp not ready within {timeout}s\n{site.smtp.log_tail()}")
        time.sleep(0.1)


def make_cert(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=ticketgate test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def limit_file_size() -> None:
    """preexec_fn of the dbfail listener: no file it writes may grow past the limit, so the
    spool write of a big mail fails in SQLite ("disk I/O error") exactly as on a full disk.
    (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process.)"""
    resource.setrlimit(resource.RLIMIT_FSIZE, (DBFAIL_FSIZE_LIMIT, DBFAIL_FSIZE_LIMIT))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    base = tmp_path_factory.mktemp("smtp-sites")
    started: dict[str, Site] = {}
    try:
        started["main"] = start_site(base / "main", "main", "max_recipients = 5")
        started["main"].start_worker()
        started["limits"] = start_site(
            base / "limits", "limits",
            f"timeout = {LIMITS_TIMEOUT_S}\nmax_sessions = 2", max_bytes=LIMITS_MAX_BYTES)
        started["backlog"] = start_site(base / "backlog", "backlog", "backlog_limit = 1")
        started["dbfail"] = start_site(base / "dbfail", "dbfail", preexec=limit_file_size)
        started["stop"] = start_site(base / "stop", "stop")
        (base / "tls").mkdir()
        pair = make_cert(base / "tls")
        if pair is not None:
            cert, key = pair
            started["tls"] = start_site(
                base / "tls", "tls",
                f'tls_cert = "{cert.as_posix()}"\ntls_key = "{key.as_posix()}"\n'
                "require_starttls = true")
            started["tls"].tls_cert = cert
        for site in started.values():
            wait_listening(site)
        yield started
    finally:
        procs = [proc for site in started.values() for proc in [*site.workers, site.smtp]]
        for proc in procs:  # all at once: a Celery worker takes seconds to shut down
            proc.terminate()
        deadline = time.monotonic() + 15
        for proc in procs:
            proc.stop(grace=max(0.1, deadline - time.monotonic()))


@pytest.fixture
def main(sites: dict[str, Site]) -> Site:
    return sites["main"]


# --- SMTP helpers ---------------------------------------------------------------------------


def make_mail(subject: str, body: str = "Hello,\r\nplease help.\r\n", *,
              sender: str = "customer@example.org", to: str = "support@example.com",
              extra: str = "") -> bytes:
    mid = f"<{uuid.uuid4().hex}@example.org>"
    return (f"From: Customer <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n{extra}"
            f"\r\n{body}").encode()


def client(site: Site, timeout: float = 30.0) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", site.port, local_hostname=HELO, timeout=timeout)


def inbound_ids(reply: bytes) -> list[int]:
    match = re.search(rb"inbound ([\d,]+)", reply)
    assert match, f"the 250 after DATA names no inbound id: {reply!r}"
    return [int(x) for x in match.group(1).split(b",")]


def send_data(conn: Raw, sender: bytes, wire: bytes) -> int:
    """One transaction to support@ on an open raw session: ``wire`` is the data as sent, its
    terminator included; returns the inbound id of the 250."""
    assert conn.cmd(b"MAIL FROM:<" + sender + b">")[0] == 250
    assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
    assert conn.cmd(b"DATA")[0] == 354
    conn.send(wire)
    code, lines = conn.reply()
    assert code == 250, lines
    (inbound_id,) = inbound_ids(lines[0])
    return inbound_id


def deliver(site: Site, msg: bytes, rcpts: list[str], sender: str = "customer@example.org",
            options: list[str] | None = None) -> tuple[list[int], bytes]:
    with client(site) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(sender, options or [])
        assert code == 250, (code, reply)
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, reply)
        code, reply = smtp.data(msg)
        assert code == 250, (code, reply, site.logs())
    return inbound_ids(reply), reply


def return_path(raw: bytes) -> bytes:
    """The Return-Path line the listener prepends (final delivery, RFC 5321 section 4.4)."""
    assert raw.startswith(b"Return-Path: <"), raw[:200]
    return raw[:raw.index(b"\r\n") + 2]


def strip_received(raw: bytes) -> tuple[bytes, bytes]:
    """Split the stored bytes, after the prepended Return-Path line, into the prepended
    Received header and the rest."""
    raw = raw[len(return_path(raw)):]
    assert raw.startswith(b"Received: from "), raw[:200]
    end = 0
    while True:
        end = raw.index(b"\r\n", end) + 2
        if raw[end:end + 1] not in (b" ", b"\t"):
            return raw[:end], raw[end:]


class Raw:
    """A raw SMTP connection: bytes out exactly as given, replies parsed line by line."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        """One (possibly multi-line) reply: its code and its text lines."""
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def cmd(self, command: bytes) -> tuple[int, list[bytes]]:
        self.send(command + b"\r\n")
        return self.reply()

    def wait_closed(self) -> bytes:
        """Read until the server closes; returns what came before the end."""
        data = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def raw(site: Site, timeout: float = 15.0) -> Iterator[Raw]:
    conn = Raw(site.port, timeout)
    try:
        code, _ = conn.reply()
        assert code == 220
        yield conn
    finally:
        conn.close()


# --- extensions, addresses, sizes ------------------------------------------------------------


def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining(main: Site) -> None:
    with raw(main) as conn:
        code, lines = conn.cmd(b"EHLO " + HELO.encode())
        assert code == 250
        assert lines[0] == HOSTNAME.encode()
        keywords = {line.split(b" ")[0].upper() for line in lines[1:]}
        assert {b"SIZE", b"8BITMIME", b"SMTPUTF8", b"PIPELINING"} <= keywords
        # No TLS configured on this site, and an MX offers no logins.
        assert b"STARTTLS" not in keywords and b"AUTH" not in keywords
        size = next(int(line.split()[1]) for line in lines if line.startswith(b"SIZE "))
        # Room is kept for the Received header, so what SIZE admits is what the pipeline admits.
        assert MAIN_MAX_BYTES - 4096 < size < MAIN_MAX_BYTES


@pytest.mark.parametrize(
    ("address", "code", "enhanced"),
    [
        pytest.param("<support@example.com>", 250, b"2.1.5", id="configured"),
        pytest.param("<SUPPORT@Example.COM>", 250, b"2.1.5", id="configured-other-case"),
        pytest.param("<help@example.com>", 250, b"2.1.5", id="second-address-same-mailbox"),
        pytest.param("<support@example.org>", 550, b"5.1.1", id="unknown-domain"),
        pytest.param("<someone@gmail.com>", 550, b"5.1.1", id="open-relay-attempt"),
        pytest.param("<nobody@example.com>", 550, b"5.1.1", id="unknown-local-part"),
        # Two unquoted "@": not an address at all (RFC 5321 §4.1.2), refused as malformed.
        pytest.param("<user%support@example.com@x>", 553, b"5.1.3", id="percent-hack-malformed"),
        # The classic percent hack aimed at our own host name: no such mailbox, no relaying.
        pytest.param(f"<support%example.com@{HOSTNAME}>", 550, b"5.1.1", id="percent-hack"),
        pytest.param('<"support@example.com"@relay.example.net>', 550, b"5.1.1",
                     id="quoted-local-part"),
        # RFC 5321 §3.6.1/§4.1.1.3: a source route is accepted but ignored; the mail is
        # delivered to the local mailbox and never relayed via "relay".
        pytest.param("<@relay.example.net:support@example.com>", 250, b"2.1.5",
                     id="source-route-to-local-mailbox"),
        pytest.param("<@relay.example.net,@b.example:support@example.com>", 250, b"2.1.5",
                     id="source-route-list"),
        pytest.param("<@relay.example.net:victim@elsewhere.example>", 550, b"5.1.1",
                     id="source-route-to-foreign-address"),
        pytest.param("<>", 550, b"5.1.1", id="null-recipient"),
    ],
)
def test_rcpt_accepted_only_for_configured_addresses(main: Site, address: str, code: int,
                                                     enhanced: bytes) -> None:
    with raw(main) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(b"MAIL FROM:<probe@example.org>")[0] == 250
        got, lines = conn.cmd(b"RCPT TO:" + address.encode())
        assert (got, lines[0].split(b" ")[0]) == (code, enhanced), lines


@pytest.mark.parametrize("rcpt", ["postmaster", "Postmaster", "POSTMASTER@example.com",
                                  "postmaster@Example.COM"])
def test_postmaster_is_accepted_as_rfc_5321_requires(main: Site, rcpt: str) -> None:
    """RFC 5321 section 4.5.1: ``postmaster`` with no domain, and at every domain served, MUST
    be accepted.  It went unanswered (550) unless a mailbox listed it; now it goes to
    ``[smtp] postmaster_mailbox``, by default the first mailbox."""
    ids, _ = deliver(main, make_mail("for the postmaster", to=f"<{rcpt}>"), [rcpt])
    row = main.inbound(ids[0])
    assert row["mailbox_id"] == 1
    assert json.loads(row["envelope_to"]) == [rcpt]


def test_source_route_is_delivered_locally_without_the_route(main: Site) -> None:
    msg = make_mail("source route")
    with client(main) as smtp:
        smtp.ehlo()
        assert smtp.mail("route@example.org")[0] == 250
        assert smtp.docmd("RCPT TO:<@relay.example.net:support@example.com>")[0] == 250
        assert smtp.docmd("RCPT TO:<@relay.example.net:other@elsewhere.example>")[0] == 550
        code, reply = smtp.data(msg)
    assert code == 250
    (inbound_id,) = inbound_ids(reply)
    row = main.inbound(inbound_id)
    assert row["mailbox_id"] == 1
    assert json.loads(row["envelope_to"]) == ["support@example.com"]


def test_size_enforced_by_mail_parameter_and_by_data(main: Site) -> None:
    with client(main) as smtp:
        smtp.ehlo()
        limit = int(smtp.esmtp_features["size"])
        code, reply = smtp.mail("big@example.org", [f"SIZE={limit + 1}"])
        assert (code, reply.split()[0]) == (552, b"5.3.4")
        # A client that declares a fitting SIZE but then sends more is refused after DATA.
        assert smtp.mail("liar@example.org", [f"SIZE={limit}"])[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        line = b"x" * 998 + b"\r\n"
        too_big = make_mail("too big") + line * (limit // len(line) + 1)
        assert len(too_big) > limit
        code, reply = smtp.data(too_big)
        assert (code, reply.split()[0]) == (552, b"5.3.4")
        # The session goes on.
        assert smtp.mail("after@example.org")[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        code, reply = smtp.data(make_mail("after a refused mail"))
        assert code == 250, reply
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                      "liar@example.org") == 0


def test_mail_of_exactly_the_advertised_size_becomes_a_ticket(
        sites: dict[str, Site], monkeypatch: pytest.MonkeyPatch) -> None:
    """A mail SIZE admits must not then be rejected as too large by the pipeline (the
    Received header makes the stored mail longer than what the client sent)."""
    site = sites["limits"]
    long_helo = "h" * 300 + ".example.net"  # the longest HELO the Received header can quote
    with client(site) as smtp:
        smtp.ehlo()
        limit = int(smtp.esmtp_features["size"])
    head = make_mail("exactly at the limit", body="")
    line = b"y" * 78 + b"\r\n"
    body = line * ((limit - len(head)) // len(line))
    msg = head + body + b"z" * (limit - len(head) - len(body) - 2) + b"\r\n"
    assert len(msg) == limit
    with smtplib.SMTP("127.0.0.1", site.port, local_hostname=long_helo, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("exact@example.org", [f"SIZE={limit}"])[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        code, reply = smtp.data(msg)
        assert code == 250, reply
    (inbound_id,) = inbound_ids(reply)
    assert site.inbound(inbound_id)["size"] > limit  # the Received header came on top
    with client(site) as smtp:
        smtp.ehlo()
        assert smtp.mail("over@example.org")[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        code, _ = smtp.data(b"X" + msg)
        assert code == 552

    # No worker on this site: run the real pipeline in-process on the site's database.
    for name in [k for k in os.environ if k.startswith("TICKETGATE_")]:
        monkeypatch.delenv(name)
    from ingest.config import load_settings
    from ingest.service import Ingestor

    ingestor = Ingestor(load_settings(site.config))
    try:
        info = ingestor.process(inbound_id)
    finally:
        ingestor.close()
    assert info.Action == "created", info


# --- what DATA stores ------------------------------------------------------------------------


def test_data_stores_raw_bytes_and_envelope_before_250(main: Site) -> None:
    msg = make_mail("envelope check", sender="envelope@example.org")
    with client(main) as smtp:
        smtp.ehlo()
        assert smtp.mail("bounces+123@example.org")[0] == 250
        assert smtp.rcpt("Support@Example.com")[0] == 250
        code, reply = smtp.data(msg)
        assert code == 250
        # Read the record while the session is still open: the 250 came after the commit.
        (inbound_id,) = inbound_ids(reply)
        row = main.inbound(inbound_id)
    queue_id = re.search(rb"queued as (\w+)", reply)
    assert queue_id and reply.startswith(b"2.0.0")
    assert row["door"] == "smtp"
    assert row["mailbox_id"] == 1
    assert row["envelope_from"] == "bounces+123@example.org"
    assert json.loads(row["envelope_to"]) == ["Support@Example.com"]
    assert row["client_ip"] == "127.0.0.1"
    assert row["helo"] == HELO
    assert queue_id.group(1).decode() in row["source"]
    assert return_path(row["raw"]) == b"Return-Path: <bounces+123@example.org>\r\n"
    received, rest = strip_received(row["raw"])
    assert rest == msg  # byte-exact after the prepended headers
    assert re.fullmatch(
        rb"Received: from client\.example\.net \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby mx\.ticketgate\.test \(ticketgate\) with ESMTP id " + queue_id.group(1)
        + rb"\r\n\tfor <support@example\.com>; [^\r\n]+\r\n", received), received
    assert row["size"] == len(row["raw"])
    assert row["sha256"] == hashlib.sha256(row["raw"]).hexdigest()


BOUNCE_LOOKING = ("From: Jane Doe <jane@customer.example>\r\nTo: support@example.com\r\n"
                  "Subject: Undelivered Mail Returned to Sender\r\n"
                  "Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n\r\n"
                  "This is the mail system at host mta.example.\r\n")


@pytest.mark.parametrize(("sender", "msg", "stored_from", "reason"), [
    pytest.param("", BOUNCE_LOOKING, "", "bounce: bounce subject", id="null-sender"),
    pytest.param("MAILER-DAEMON@mta.example", BOUNCE_LOOKING, "MAILER-DAEMON@mta.example",
                 "bounce: bounce subject", id="mailer-daemon-sender"),
    pytest.param("", "Subject: hello\r\n\r\nno From header at all\r\n", "",
                 "auto-reply", id="null-sender-no-from"),
])
def test_the_envelope_sender_is_the_return_path_so_bounces_open_no_ticket(
        main: Site, sender: str, msg: str, stored_from: str, reason: str) -> None:
    """Final delivery adds Return-Path (RFC 5321 section 4.4): the listener writes MAIL FROM
    there, ``<>`` for a bounce, and bounce and auto-reply detection read it, as they read the
    delivering MTA's in mail fetched over IMAP.  Without it, these three became tickets."""
    wire = (msg.replace("Jane", f"Jane {uuid.uuid4().hex[:6]}")).encode()
    ids, _ = deliver(main, wire, ["support@example.com"], sender=sender)
    row = main.inbound(ids[0])
    assert return_path(row["raw"]) == f"Return-Path: <{stored_from}>\r\n".encode()
    assert row["envelope_from"] == stored_from
    (done,) = main.wait_final(ids)
    assert done["state"] == "ignored", done
    assert done["ticket_id"] is None
    assert reason in done["reason"], done["reason"]


def test_one_mail_to_two_mailboxes_gives_two_records_and_two_tickets(main: Site) -> None:
    msg = make_mail("for support and billing", to="support@example.com, billing@example.com")
    ids, _ = deliver(main, msg, ["support@example.com", "billing@example.com",
                                 "help@example.com"])
    assert len(ids) == 2  # help@ is mailbox 1 again: one record per mailbox, not per RCPT
    rows = main.wait_final(ids)
    assert sorted(r["mailbox_id"] for r in rows) == [1, 2]
    assert rows[0]["raw"] == rows[1]["raw"]
    assert rows[0]["received_at"] is not None
    assert [r["state"] for r in rows] == ["created", "created"]
    tickets = main.query(
        f"SELECT id, mailbox_id, title FROM tickets WHERE id IN ({rows[0]['ticket_id']}, "
        f"{rows[1]['ticket_id']}) ORDER BY mailbox_id")
    assert [(t[1], t[2]) for t in tickets] == [(1, "for support and billing"),
                                               (2, "for support and billing")]
    received, _ = strip_received(rows[0]["raw"])
    assert b"\tfor <" not in received  # several recipients: none is named


def test_rcpt_count_limit(main: Site) -> None:
    with client(main) as smtp:
        smtp.ehlo()
        assert smtp.mail("many@example.org")[0] == 250
        for rcpt in ["support@example.com"] * 4 + ["billing@example.com"]:
            assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.rcpt("help@example.com")
        assert (code, reply.split()[0]) == (452, b"4.5.3")
        code, reply = smtp.data(make_mail("five recipients"))
        assert code == 250
    assert len(inbound_ids(reply)) == 2


def test_smtputf8_and_8bitmime(main: Site) -> None:
    msg = ("From: Jörg Müller <jörg@exämple.de>\r\nTo: støtte@example.com\r\n"
           "Subject: Grüße aus Köln\r\nMessage-ID: <utf8-" + uuid.uuid4().hex + "@exämple.de>\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nDer Drucker druckt nicht. Schöne Grüße\r\n"
           ).encode("utf-8")
    ids, _ = deliver(main, msg, ["støtte@example.com"], sender="jörg@exämple.de",
                     options=["SMTPUTF8", "BODY=8BITMIME"])
    row = main.inbound(ids[0])
    assert row["envelope_from"] == "jörg@exämple.de"
    assert json.loads(row["envelope_to"]) == ["støtte@example.com"]
    assert row["mailbox_id"] == 1
    received, rest = strip_received(row["raw"])
    assert rest == msg
    assert b" with UTF8SMTP id " in received  # RFC 6531 section 3.7.3
    (done,) = main.wait_final(ids)
    assert done["state"] == "created"
    assert main.query("SELECT title FROM tickets WHERE id = ?", done["ticket_id"]) == [
        ("Grüße aus Köln",)]


def _tls_site(sites: dict[str, Site]) -> Site:
    """The STARTTLS listener; its certificate is made with the openssl CLI.  Without it the TLS
    tests skip locally and fail under TICKETGATE_REQUIRE_SERVICES=1 (CI installs openssl)."""
    site = sites.get("tls")
    if site is None or site.tls_cert is None:
        reason = "the openssl CLI is not installed (apt-get install openssl)"
        if os.environ.get("TICKETGATE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return site


def test_received_header_names_esmtps_after_starttls_and_tls_is_required(
        sites: dict[str, Site]) -> None:
    site = _tls_site(sites)
    with raw(site) as conn:
        code, lines = conn.cmd(b"EHLO " + HELO.encode())
        assert code == 250 and b"STARTTLS" in lines
        code, lines = conn.cmd(b"MAIL FROM:<plain@example.org>")
        assert (code, lines[0].split()[0]) == (530, b"5.7.0")
    context = ssl.create_default_context(cafile=str(site.tls_cert))  # verify the test's cert
    msg = make_mail("over TLS")
    with client(site) as smtp:
        smtp.ehlo()
        smtp.starttls(context=context)
        code, _ = smtp.ehlo()
        assert code == 250
        assert not smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")  # no logins on an MX, not even under TLS
        assert smtp.mail("tls@example.org")[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        code, reply = smtp.data(msg)
        assert code == 250
        assert isinstance(smtp.sock, ssl.SSLSocket)
    row = site.inbound(inbound_ids(reply)[0])
    received, rest = strip_received(row["raw"])
    assert b" with ESMTPS id " in received
    assert rest == msg


def test_commands_injected_before_the_tls_handshake_are_discarded(sites: dict[str, Site]) -> None:
    """CVE-2011-0411 style: plaintext sent after STARTTLS must not run inside the TLS session."""
    site = _tls_site(sites)
    with raw(site) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        conn.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert conn.reply()[0] == 220
        assert conn.buf == b""  # nothing answered the injected command in plaintext
        context = ssl.create_default_context(cafile=str(site.tls_cert))
        conn.sock = context.wrap_socket(conn.sock, server_hostname="127.0.0.1")
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        code, lines = conn.cmd(b"RCPT TO:<support@example.com>")
        assert code == 503, lines  # "need MAIL": the injected MAIL FROM was thrown away


def test_starttls_inside_tls_is_refused_and_the_session_goes_on(sites: dict[str, Site]) -> None:
    """RFC 3207 section 4.2: no second STARTTLS.  It was answered 220, and the session then
    died with a traceback in the log for each try."""
    site = _tls_site(sites)
    with raw(site) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(b"STARTTLS")[0] == 220
        context = ssl.create_default_context(cafile=str(site.tls_cert))
        conn.sock = context.wrap_socket(conn.sock, server_hostname="127.0.0.1")
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        code, lines = conn.cmd(b"STARTTLS")
        assert (code, lines[0].split()[0]) == (554, b"5.5.1"), lines
        inbound_id = send_data(conn, b"twice-tls@example.org", make_mail("after a second STARTTLS")
                               + b".\r\n")
    assert site.inbound(inbound_id)["envelope_from"] == "twice-tls@example.org"
    assert "SSLProtocol" not in site.smtp.log.read_text(encoding="utf-8", errors="replace")


def test_pipelined_session(main: Site) -> None:
    msg = make_mail("pipelined", to="support@example.com, billing@example.com")
    with raw(main) as conn:
        code, lines = conn.cmd(b"EHLO " + HELO.encode())
        assert code == 250 and b"PIPELINING" in lines
        conn.send(b"MAIL FROM:<pipe@example.org>\r\n"
                  b"RCPT TO:<support@example.com>\r\n"
                  b"RCPT TO:<nobody@example.com>\r\n"
                  b"RCPT TO:<billing@example.com>\r\n"
                  b"DATA\r\n")
        assert [conn.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
        # The end of the data and the next transaction in one write too (RFC 2920 §3.1).
        conn.send(msg + b".\r\nRSET\r\nMAIL FROM:<pipe2@example.org>\r\nNOOP\r\nQUIT\r\n")
        code, lines = conn.reply()
        assert code == 250, lines
        ids = inbound_ids(lines[0])
        assert [conn.reply()[0] for _ in range(4)] == [250, 250, 250, 221]
    rows = [main.inbound(i) for i in ids]
    assert sorted(r["mailbox_id"] for r in rows) == [1, 2]
    assert json.loads(rows[0]["envelope_to"]) == ["support@example.com", "billing@example.com"]
    assert strip_received(rows[0]["raw"])[1] == msg


def test_bare_lf_line_endings_accepted_and_no_smuggling(main: Site) -> None:
    mid = f"<bare-lf-{uuid.uuid4().hex}@example.org>"
    msg = (b"From: Unix Mailer <lf@example.org>\nTo: support@example.com\n"
           b"Subject: bare LF line endings\nMessage-ID: " + mid.encode() + b"\n\n"
           b"first line\n"
           # An SMTP smuggling attempt: only CRLF.CRLF ends the data.
           b".\nMAIL FROM:<smuggled@evil.example>\nRCPT TO:<billing@example.com>\nDATA\n"
           b"Subject: smuggled\n\nsmuggled body\n.\n"
           b"last line\n")
    with raw(main) as conn:
        assert conn.cmd(b"EHLO unix.example.org")[0] == 250
        inbound_id = send_data(conn, b"lf@example.org", msg + b"\r\n.\r\n")
        assert conn.cmd(b"QUIT")[0] == 221  # exactly one reply came for the whole data
    row = main.inbound(inbound_id)
    assert strip_received(row["raw"])[1] == msg + b"\r\n"
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                      "smuggled@evil.example") == 0
    (done,) = main.wait_final([inbound_id])
    assert done["state"] == "created", done
    assert main.query("SELECT title, num_messages FROM tickets WHERE id = ?",
                      done["ticket_id"]) == [("bare LF line endings", 1)]


def test_large_bare_lf_mail_and_dot_stuffing(main: Site) -> None:
    """A 300 KB mail with bare-LF line endings (one CRLF-"line" far over the 64 KiB stream
    limit) is taken whole; dot-stuffed lines are unstuffed, also right at the start of a block
    and of the data; a line ending in a dot does not end the data."""
    mid = f"<big-lf-{uuid.uuid4().hex}@example.org>"
    body = b"".join(b"line %05d of a unix mailer's long report.\n" % i for i in range(7000))
    msg = (b"From: Unix Mailer <lf@example.org>\nTo: support@example.com\n"
           b"Subject: large bare LF\nMessage-ID: " + mid.encode() + b"\n\n" + body
           + b"end.\r\n.leading dot\r\n..two dots\r\nlast.\r\n")
    stuffed = msg.replace(b"\r\n.", b"\r\n..")
    assert len(msg) > 300_000
    with raw(main) as conn:
        assert conn.cmd(b"EHLO unix.example.org")[0] == 250
        inbound_id = send_data(conn, b"lf@example.org", stuffed + b".\r\n")
        assert conn.cmd(b"QUIT")[0] == 221
    assert strip_received(main.inbound(inbound_id)["raw"])[1] == msg


def test_empty_data_and_overlong_line(main: Site) -> None:
    with raw(main) as conn:
        assert conn.cmd(b"EHLO client.example.org")[0] == 250
        # No content at all: the end right after DATA is seen; the mail is taken, as Postfix
        # does, and the pipeline ignores it (only the Received header is in it).
        inbound_id = send_data(conn, b"a@example.org", b".\r\n")
        assert conn.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
        assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
        assert conn.cmd(b"DATA")[0] == 354
        conn.send(make_mail("overlong") + b"x" * (70 * 1024) + b"\r\n.\r\n")
        assert conn.reply()[0] == 500
        assert conn.cmd(b"NOOP")[0] == 250
        # The same line between short ones, all arriving in one block: it was only looked for
        # at a block's first and last line, and 70 and 120 KiB lines were taken.
        for length in (70 * 1024, 120 * 1024):
            assert conn.cmd(b"MAIL FROM:<long-line@example.org>")[0] == 250
            assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
            assert conn.cmd(b"DATA")[0] == 354
            conn.send(make_mail("overlong inside") + b"y" * length + b"\r\nend\r\n.\r\n")
            code, lines = conn.reply()
            assert (code, lines[0].split()[0]) == (500, b"5.5.2"), lines
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                      "long-line@example.org") == 0
    assert strip_received(main.inbound(inbound_id)["raw"])[1] == b""
    (done,) = main.wait_final([inbound_id])
    assert (done["state"], done["reason"]) == (
        "ignored", "empty message: no header besides trace fields and no body")


def test_twenty_megabyte_mail_is_stored_byte_exact(main: Site) -> None:
    payload = base64.encodebytes(os.urandom(15_000_000)).replace(b"\n", b"\r\n")
    msg = make_mail(
        "twenty megabytes", body=(
            "--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nThe log file is attached.\r\n"
            "--BOUNDARY\r\nContent-Type: application/octet-stream; name=big.log\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=big.log\r\n\r\n"),
        extra="MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BOUNDARY\r\n",
    ) + payload + b"--BOUNDARY--\r\n"
    assert len(msg) > 20 * 1000 * 1000
    ids, _ = deliver(main, msg, ["support@example.com"])
    row = main.inbound(ids[0])
    _, rest = strip_received(row["raw"])
    assert hashlib.sha256(rest).hexdigest() == hashlib.sha256(msg).hexdigest()
    (done,) = main.wait_final(ids)
    assert done["state"] == "created", done


# --- the memory budget of DATA ---------------------------------------------------------------


def open_data(site: Site, sender: bytes, size: int | None) -> Raw:
    """A raw session that has sent DATA (its reply not read yet), SIZE declared or not."""
    conn = Raw(site.port, timeout=30)
    assert conn.reply()[0] == 220
    assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
    declared = b"" if size is None else b" SIZE=" + str(size).encode()
    assert conn.cmd(b"MAIL FROM:<" + sender + b">" + declared)[0] == 250
    assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
    conn.send(b"DATA\r\n")
    return conn


def test_data_past_its_declared_size_is_held_to_the_budget(main: Site) -> None:
    """A SIZE is a claim, not a limit: two sessions declaring one byte and sending 20 MiB each
    would need more than the listener's 32 MiB for mail in flight.  At least one keeps nothing
    and is told 452 (thirty such sessions took the listener to 700 MB); the first, whose data
    is all in by then, is usually taken, but if both were still arriving side by side neither
    may fit.  An honest declaration afterwards is taken: the room came back."""
    chunk = b"z" * 76 + b"\r\n"
    body = chunk * (20 * 1024 * 1024 // len(chunk))
    senders = [b"claims-one-byte-a@example.org", b"claims-one-byte-b@example.org"]
    sessions = [open_data(main, sender, 1) for sender in senders]
    try:
        assert [conn.reply()[0] for conn in sessions] == [354, 354]
        sessions[0].send(make_mail("twenty MiB declared as one byte") + body)  # no end yet
        time.sleep(2)  # the listener reads it meanwhile
        sessions[1].send(make_mail("twenty MiB more declared as one byte") + body + b".\r\n")
        sessions[0].send(b".\r\n")
        replies = sorted((code, lines[0].split()[0])
                         for code, lines in (conn.reply() for conn in sessions))
    finally:
        for conn in sessions:
            conn.close()
    assert replies in ([(250, b"2.0.0"), (452, b"4.3.1")], [(452, b"4.3.1")] * 2), replies
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from IN (?, ?)",
                      *(sender.decode() for sender in senders)) == replies.count((250, b"2.0.0"))
    honest = make_mail("twenty MiB declared as such") + body
    ids, _ = deliver(main, honest, ["support@example.com"], options=[f"SIZE={len(honest)}"])
    assert len(ids) == 1


def test_ordinary_mail_is_not_held_behind_a_large_one_waiting_for_room(main: Site) -> None:
    """While one session holds most of the budget (a large declared mail, arriving slowly), a
    second large one waits for room before its 354; mail of ordinary size goes past it.  It
    waited in line, so two such senders could stop all mail for as long as they kept on."""
    large = 25_000_000
    holder = open_data(main, b"holds-the-budget@example.org", large)
    waiter = small = None
    try:
        assert holder.reply()[0] == 354
        holder.send(make_mail("a large mail, arriving slowly"))
        waiter = open_data(main, b"waits-for-room@example.org", large)
        small = open_data(main, b"ordinary-size@example.org", None)
        small.sock.settimeout(10)
        assert small.reply()[0] == 354
        small.send(make_mail("ordinary size") + b".\r\n")
        assert small.reply()[0] == 250
        waiter.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiter.reply()  # still no room for it
        holder.send(b"the rest\r\n.\r\n")
        assert holder.reply()[0] == 250
        waiter.sock.settimeout(15)
        assert waiter.reply()[0] == 354  # the room the holder left
        waiter.send(make_mail("large, after the holder") + b".\r\n")
        assert waiter.reply()[0] == 250
    finally:
        for conn in (holder, waiter, small):
            if conn is not None:
                conn.close()


def test_refused_data_takes_no_room_while_it_is_read(main: Site) -> None:
    """Data refused as too long (a line past 64 KiB) or too large is read to its end and kept
    nowhere; it took room all the same, so one client sending more than the budget held every
    other large mail off until it stopped."""
    line = b"r" * 76 + b"\r\n"
    refused = open_data(main, b"refused-data@example.org", None)
    waiting = None
    try:
        assert refused.reply()[0] == 354
        refused.send(make_mail("over-long line first") + b"x" * (70 * 1024) + b"\r\n"
                     + line * (34 * 1024 * 1024 // len(line)))  # more than the whole budget
        waiting = open_data(main, b"large-after-refused@example.org", 25_000_000)
        waiting.sock.settimeout(10)
        assert waiting.reply()[0] == 354
        waiting.send(make_mail("large, while refused data streams") + b".\r\n")
        assert waiting.reply()[0] == 250
        refused.send(b".\r\n")
        code, lines = refused.reply()
        assert (code, lines[0].split()[0]) == (500, b"5.5.2"), lines
    finally:
        for conn in (refused, waiting):
            if conn is not None:
                conn.close()


# --- broken clients ---------------------------------------------------------------------------


def test_connection_dropped_in_data_stores_nothing(main: Site) -> None:
    before = main.count("SELECT count(*) FROM inbound_mails")
    for how in ("close", "reset"):
        sender = f"dropped-{how}@example.org"
        with raw(main) as conn:
            assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
            assert conn.cmd(b"MAIL FROM:<" + sender.encode() + b">")[0] == 250
            assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
            assert conn.cmd(b"DATA")[0] == 354
            conn.send(make_mail(f"dropped by {how}") + b"half of the body ...\r\n" * 2000)
            if how == "reset":  # RST instead of FIN
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
    # A complete mail after the drops is stored: the listener noticed both drops first.
    deliver(main, make_mail("after the drops"), ["support@example.com"])
    time.sleep(0.5)
    assert main.count("SELECT count(*) FROM inbound_mails") == before + 1
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from LIKE 'dropped-%'"
                      ) == 0


def test_garbage_gets_5xx_and_other_clients_are_served(main: Site) -> None:
    with raw(main) as junk:
        answers = [
            junk.cmd(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff"),  # binary junk
            junk.cmd(b"A" * 100_000),  # far longer than any line buffer
            junk.cmd(b"EHLO " + b"h" * 2000),  # longer than a command may be
            junk.cmd(b"XYZZY plugh"),
            junk.cmd(b"GET / HTTP/1.1"),
            junk.cmd(b"MAIL FROM:<ok@example.org>"),  # before EHLO: 503
        ]
        assert all(500 <= code < 600 for code, _ in answers), answers
        # The junk connection is still usable; meanwhile another client delivers a mail.
        deliver(main, make_mail("while junk is sent"), ["support@example.com"])
        assert junk.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert junk.cmd(b"MAIL FROM:<\xff\xfe@example.org>")[0] == 553
        assert junk.cmd(b"MAIL FROM:<ok@example.org>")[0] == 250
        assert junk.cmd(b"RCPT TO:<\xc3\x28@example.com>")[0] == 553
        assert junk.cmd(b"RCPT TO:<support@example.com>")[0] == 250
        assert junk.cmd(b"DATA")[0] == 354
        # A data line longer than the line buffer: refused after the data, nothing stored.
        junk.send(make_mail("overlong line") + b"L" * 100_000 + b"\r\n.\r\n")
        code, _ = junk.reply()
        assert 500 <= code < 600
        # Too many unknown commands (XYZZY and GET counted too): goodbye, and the server hangs up.
        replies = []
        while not replies or replies[-1] != 502:
            replies.append(junk.cmd(b"BOGUS")[0])
            assert len(replies) <= 5, replies
        assert set(replies[:-1]) <= {500}
        junk.wait_closed()
    assert main.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                      "ok@example.org") == 0
    deliver(main, make_mail("after the junk"), ["support@example.com"])


def test_invalid_utf8_in_helo_is_stored_replaced(main: Site) -> None:
    with raw(main) as conn:
        assert conn.cmd(b"EHLO bad\xff\xfehelo")[0] == 250
        assert conn.cmd(b"MAIL FROM:<helo@example.org>")[0] == 250
        assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
        assert conn.cmd(b"DATA")[0] == 354
        conn.send(make_mail("odd helo") + b".\r\n")
        code, lines = conn.reply()
        assert code == 250, lines
    row = main.inbound(inbound_ids(lines[0])[0])
    assert row["helo"] == "bad\ufffd\ufffdhelo"


# --- limits: sessions, timeouts, backlog, database failure -------------------------------


def test_concurrent_session_cap(sites: dict[str, Site]) -> None:
    site = sites["limits"]
    first, second = Raw(site.port), Raw(site.port)
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        third = Raw(site.port)
        try:
            code, lines = third.reply()
            assert (code, lines[0].split()[0]) == (421, b"4.3.2")
            third.wait_closed()
        finally:
            third.close()
        first.cmd(b"QUIT")
        first.close()
        deadline = time.monotonic() + 5
        while True:  # a slot is free again once the server has seen the QUIT
            again = Raw(site.port)
            try:
                code, _ = again.reply()
            finally:
                again.close()
            if code == 220 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == 220
    finally:
        first.close()
        second.close()


def test_idle_session_is_closed(sites: dict[str, Site]) -> None:
    site = sites["limits"]
    with raw(site, timeout=LIMITS_TIMEOUT_S * 5) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        started = time.monotonic()
        rest = conn.wait_closed()
        waited = time.monotonic() - started
    assert rest.startswith(b"421 4.4.2"), rest
    assert LIMITS_TIMEOUT_S * 0.8 <= waited < LIMITS_TIMEOUT_S * 4


def test_slow_data_longer_than_the_timeout_is_not_cut_off(sites: dict[str, Site]) -> None:
    """Idle means nothing arrives; a client still streaming DATA is not idle."""
    site = sites["limits"]
    with raw(site) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(b"MAIL FROM:<slow@example.org>")[0] == 250
        assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250
        assert conn.cmd(b"DATA")[0] == 354
        conn.send(make_mail("slow sender", body=""))
        started = time.monotonic()
        while time.monotonic() - started < LIMITS_TIMEOUT_S * 2.5:
            conn.send(b"another line of a slow upload\r\n")
            time.sleep(LIMITS_TIMEOUT_S / 4)
        conn.send(b".\r\n")
        code, lines = conn.reply()
        assert code == 250, lines


def test_backlog_limit_defers_new_mail_until_a_worker_catches_up(sites: dict[str, Site]) -> None:
    site = sites["backlog"]  # backlog_limit = 1 and no worker yet
    first, _ = deliver(site, make_mail("first in the backlog"), ["support@example.com"])
    assert site.inbound(first[0])["state"] == "received"
    with client(site) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("second@example.org")
        assert code == 451, reply
    assert site.count("SELECT count(*) FROM inbound_mails") == 1
    site.start_worker()
    (done,) = site.wait_final(first)
    assert done["state"] == "created"
    second, _ = deliver(site, make_mail("second, after the backlog drained"),
                        ["billing@example.com"], sender="second@example.org")
    (done,) = site.wait_final(second)
    assert done["state"] == "created"


def test_database_failure_answers_451_and_stores_nothing(sites: dict[str, Site]) -> None:
    """The dbfail listener may not grow any file past 4 MB (RLIMIT_FSIZE): a mail of 2.5 MB
    for two mailboxes needs two records, 5 MB, so the spool transaction fails in SQLite half
    way, after the first record was written.  The client must get 451 4.3.0 and neither record
    may survive."""
    site = sites["dbfail"]
    before = site.count("SELECT count(*) FROM inbound_mails")
    line = b"d" * 98 + b"\r\n"
    big = make_mail("does not fit on the disk") + line * 25_000
    with client(site) as smtp:
        smtp.ehlo()
        assert smtp.mail("diskfull@example.org")[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        assert smtp.rcpt("billing@example.com")[0] == 250
        code, reply = smtp.data(big)
        assert (code, reply.split()[0]) == (451, b"4.3.0"), (reply, site.logs())
        # The same session still works for a mail that fits.
        assert smtp.mail("small@example.org")[0] == 250
        assert smtp.rcpt("support@example.com")[0] == 250
        code, reply = smtp.data(make_mail("small enough"))
        assert code == 250, reply
    assert site.count("SELECT count(*) FROM inbound_mails") == before + 1
    assert site.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                      "diskfull@example.org") == 0
    assert site.smtp.alive()


def test_sigterm_lets_the_mail_in_data_finish_and_closes_idle_sessions(
        sites: dict[str, Site]) -> None:
    site = sites["stop"]
    with raw(site) as idle, raw(site) as busy:
        assert idle.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert busy.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert busy.cmd(b"MAIL FROM:<inflight@example.org>")[0] == 250
        assert busy.cmd(b"RCPT TO:<support@example.com>")[0] == 250
        assert busy.cmd(b"DATA")[0] == 354
        msg = make_mail("in flight during shutdown")
        busy.send(msg[:40])
        site.smtp.popen.send_signal(signal.SIGTERM)
        # The idle session is told why it is closed; by then the listener is stopping.
        assert idle.wait_closed().startswith(b"421 4.3.2")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", site.port), timeout=2).close()
        busy.send(msg[40:] + b".\r\n")
        code, lines = busy.reply()
        assert code == 250, lines
        (inbound_id,) = inbound_ids(lines[0])
        assert busy.wait_closed().startswith(b"421 4.3.2")
    assert site.smtp.popen.wait(15) == 0
    assert strip_received(site.inbound(inbound_id)["raw"])[1] == msg


# --- the end state -----------------------------------------------------------------------


def test_every_accepted_mail_ends_as_a_ticket(main: Site) -> None:
    """Runs last in this module: every mail any test above got a 250 for, on the main site,
    reaches exactly one ticket once the worker has run."""
    deliver(main, make_mail("the last one"), ["support@example.com", "billing@example.com"])
    ids = [r[0] for r in main.query("SELECT id FROM inbound_mails ORDER BY id")]
    rows = main.wait_final(ids)
    # The empty DATA of test_empty_data_and_overlong_line is the one mail with nothing in it.
    empty = [r for r in rows if (r["reason"] or "").startswith("empty message")]
    assert [r["state"] for r in empty] == ["ignored"]
    # So are the bounces of test_the_envelope_sender_is_the_return_path_so_bounces_open_no_ticket.
    bounces = [r for r in rows if r["envelope_from"] in ("", "MAILER-DAEMON@mta.example")]
    assert [r["state"] for r in bounces] == ["ignored"] * 3
    rows = [r for r in rows if r not in empty and r not in bounces]
    assert {r["state"] for r in rows} == {"created"}, [
        (r["id"], r["state"], r["reason"], r["error"]) for r in rows if r["state"] != "created"]
    ticket_ids = [r["ticket_id"] for r in rows]
    assert len(set(ticket_ids)) == len(rows)
    assert main.count("SELECT count(*) FROM tickets") == len(rows)

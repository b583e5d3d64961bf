"""SMTP hardening (issue 6) over real sockets: per-IP limits, invalid-recipient limit, greeting
delay, pipelining abuse, open-relay address forms, control characters in HELO / MAIL FROM.

Sites, processes and wire helpers come from ``tests/test_smtp.py``; this module starts its own
``ticketgate smtp`` listeners (no worker: what is checked is what the listener stores):

* ``strict``: tight per-IP limits, a bad-RCPT limit of 3 and a 0.5 s greeting delay.  Linux
  routes all of 127.0.0.0/8 to the loopback interface, so each test connects from its own
  127.0.x.y address and is its own client to the per-IP counters;
* ``relay``: the default limits (no greeting delay), for the address and injection tests;
* ``catchall``: a mailbox with ``accept_any`` (like the demo set-up), tight limits and
  ``ip_limits_exempt_loopback = true``.

The limiter's sliding window and memory bound are checked in-process with a fake clock, since
a real window is a minute long.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import itertools
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from ingest.config import SmtpSection, load_settings
from ingest.errors import ConfigError
from tests.test_smtp import (
    HELO,
    HOSTNAME,
    Proc,
    Raw,
    Site,
    free_port,
    inbound_ids,
    make_mail,
    raw,
    start_site,
    strip_received,
    wait_listening,
)
from workers.smtp import DataBudget, PeerLimits, _received_from

GREETING_DELAY_S = 0.5
MAX_CONNECTIONS = 2
MAX_CONNECTIONS_PER_MINUTE = 6
MAX_MESSAGES_PER_MINUTE = 3
MAX_BAD_RECIPIENTS = 3
STRICT = f"""
greeting_delay = {GREETING_DELAY_S}
max_connections_per_ip = {MAX_CONNECTIONS}
max_connections_per_ip_per_minute = {MAX_CONNECTIONS_PER_MINUTE}
max_messages_per_ip_per_minute = {MAX_MESSAGES_PER_MINUTE}
max_bad_recipients = {MAX_BAD_RECIPIENTS}
"""
CATCHALL_CONFIG = """
[service]
data_dir = "{data_dir}"

[smtp]
hostname = "{hostname}"
greeting_delay = 0
max_connections_per_ip = 1
max_connections_per_ip_per_minute = 1
max_messages_per_ip_per_minute = 1
ip_limits_exempt_loopback = true

[[category]]
name = "General"
[[priority]]
name = "Medium"

[[mailbox]]
id = 1
name = "Catch-all"
accept_any = true
category = "General"
priority = "Medium"
"""
_ADDRESSES = (f"127.0.{20 + n // 250}.{1 + n % 250}" for n in itertools.count())


def fresh_ip() -> str:
    """A loopback address no other test used: a new client to the per-IP limits."""
    return next(_ADDRESSES)


@pytest.fixture(scope="module")
def hsites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    base = tmp_path_factory.mktemp("smtp-hardening")
    started: dict[str, Site] = {}
    try:
        started["strict"] = start_site(base / "strict", "strict", STRICT)
        started["relay"] = start_site(base / "relay", "relay")
        root = base / "catchall"
        root.mkdir()
        config = root / "ticketgate.toml"
        config.write_text(CATCHALL_CONFIG.format(data_dir=(root / "data").as_posix(),
                                                 hostname=HOSTNAME), encoding="utf-8")
        port = free_port()
        started["catchall"] = Site(
            "catchall", root, config, root / "data" / "ticketgate.db", port,
            Proc(["smtp", "--config", str(config), "--port", str(port)], root,
                 root / "smtp.log"))
        for site in started.values():
            wait_listening(site)
        yield started
    finally:
        for site in started.values():
            site.smtp.terminate()
        for site in started.values():
            site.smtp.stop()


@pytest.fixture
def strict(hsites: dict[str, Site]) -> Site:
    return hsites["strict"]


@pytest.fixture
def relay(hsites: dict[str, Site]) -> Site:
    return hsites["relay"]


@pytest.fixture
def catchall(hsites: dict[str, Site]) -> Site:
    return hsites["catchall"]


# --- wire helpers ---------------------------------------------------------------------------


class RawFrom(Raw):
    """A raw connection from a chosen loopback address."""

    def __init__(self, port: int, source: str, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""


@contextlib.contextmanager
def session(site: Site, source: str) -> Iterator[RawFrom]:
    conn = RawFrom(site.port, source)
    try:
        code, lines = conn.reply()
        assert code == 220, lines
        yield conn
    finally:
        conn.close()


def refused_at_connect(site: Site, source: str) -> tuple[int, bytes]:
    """Connect; return the first reply (code, text) and check the server hangs up after it."""
    conn = RawFrom(site.port, source)
    try:
        code, lines = conn.reply()
        assert conn.wait_closed() == b""
    finally:
        conn.close()
    return code, lines[0]


def quit_and_wait(conn: Raw) -> None:
    """QUIT and read to the end: the server has counted the session as closed before its
    socket closes, so a new connection right after is not refused for this one."""
    assert conn.cmd(b"QUIT")[0] == 221
    conn.wait_closed()


def send_mail(conn: Raw, sender: str, msg: bytes, rcpt: str = "support@example.com") -> bytes:
    assert conn.cmd(f"MAIL FROM:<{sender}>".encode())[0] == 250
    assert conn.cmd(f"RCPT TO:<{rcpt}>".encode())[0] == 250
    assert conn.cmd(b"DATA")[0] == 354
    conn.send(msg + b".\r\n")
    code, lines = conn.reply()
    assert code == 250, lines
    return lines[0]


def enhanced(lines: list[bytes]) -> bytes:
    return lines[0].split(b" ")[0]


# --- per-IP limits --------------------------------------------------------------------------


def test_concurrent_connections_per_ip(strict: Site) -> None:
    ip = fresh_ip()
    first, second = RawFrom(strict.port, ip), RawFrom(strict.port, ip)
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        code, text = refused_at_connect(strict, ip)
        assert (code, text.split()[0]) == (421, b"4.7.0"), text
        with session(strict, fresh_ip()) as other:  # another client is served meanwhile
            assert other.cmd(b"EHLO " + HELO.encode())[0] == 250
        quit_and_wait(first)
        with session(strict, ip) as again:  # a slot of this client is free again
            assert again.cmd(b"EHLO " + HELO.encode())[0] == 250
    finally:
        first.close()
        second.close()


def test_connection_rate_per_ip(strict: Site) -> None:
    ip = fresh_ip()
    for _ in range(MAX_CONNECTIONS_PER_MINUTE):
        with session(strict, ip) as conn:
            quit_and_wait(conn)
    code, text = refused_at_connect(strict, ip)
    assert (code, text.split()[0]) == (421, b"4.7.0"), text
    assert b"per minute" in text  # the rate, not the concurrent count (nothing is open)
    with session(strict, fresh_ip()) as other:
        assert other.cmd(b"EHLO " + HELO.encode())[0] == 250


def test_message_rate_per_ip(strict: Site) -> None:
    ip, sender = fresh_ip(), f"rate-{uuid.uuid4().hex[:8]}@example.org"
    with session(strict, ip) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        for n in range(MAX_MESSAGES_PER_MINUTE):
            send_mail(conn, sender, make_mail(f"message {n} within the rate"))
        code, lines = conn.cmd(f"MAIL FROM:<{sender}>".encode())
        assert (code, enhanced(lines)) == (451, b"4.7.1"), lines
        assert conn.cmd(b"NOOP")[0] == 250  # the session goes on; only new mail waits
    with session(strict, ip) as conn:  # a new connection does not reset the count
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        code, lines = conn.cmd(f"MAIL FROM:<{sender}>".encode())
        assert (code, enhanced(lines)) == (451, b"4.7.1"), lines
    with session(strict, fresh_ip()) as other:
        assert other.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert other.cmd(f"MAIL FROM:<{sender}>".encode())[0] == 250
    assert strict.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                        sender) == MAX_MESSAGES_PER_MINUTE


def test_loopback_exempt_from_per_ip_limits_when_configured(catchall: Site) -> None:
    """The catchall site allows 1 connection and 1 message per client, but exempts loopback."""
    conns = [Raw(catchall.port) for _ in range(3)]
    try:
        assert [conn.reply()[0] for conn in conns] == [220, 220, 220]
        for n, conn in enumerate(conns):
            assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
            for m in range(2):
                send_mail(conn, "exempt@example.org", make_mail(f"exempt {n}.{m}"))
    finally:
        for conn in conns:
            conn.close()


# --- invalid recipients, greeting, pipelining -----------------------------------------------


def test_invalid_recipients_end_the_session(strict: Site) -> None:
    with session(strict, fresh_ip()) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(b"MAIL FROM:<dictionary@example.org>")[0] == 250
        assert conn.cmd(b"RCPT TO:<alice@example.com>")[0] == 550
        assert conn.cmd(b"RCPT TO:<support@example.com>")[0] == 250  # valid ones do not count
        assert conn.cmd(b"RCPT TO:<bob@example.com@x>")[0] == 553  # malformed ones do
        assert conn.cmd(b"RSET")[0] == 250  # and a new transaction starts no new count
        assert conn.cmd(b"MAIL FROM:<dictionary@example.org>")[0] == 250
        assert conn.cmd(b"RCPT TO:<carol@example.com>")[0] == 550
        conn.send(b"RCPT TO:<support@example.com>\r\nDATA\r\n")
        code, lines = conn.reply()
        assert (code, enhanced(lines)) == (421, b"4.7.0"), lines
        assert conn.wait_closed() == b""  # the pipelined DATA was not run


def test_client_talking_before_the_greeting_is_rejected(strict: Site) -> None:
    conn = RawFrom(strict.port, fresh_ip())
    try:
        conn.send(b"EHLO spam.example\r\nMAIL FROM:<early@example.org>\r\n")
        data = conn.wait_closed()
    finally:
        conn.close()
    assert data.startswith(b"554 5.5.0 "), data
    assert data.count(b"\r\n") == 1, data  # no 220, and nothing the client sent was run
    started = time.monotonic()
    with session(strict, fresh_ip()) as polite:  # a client that waits is served
        waited = time.monotonic() - started
        assert polite.cmd(b"EHLO " + HELO.encode())[0] == 250
    assert waited >= GREETING_DELAY_S * 0.8


@pytest.mark.parametrize("greeting", [b"EHLO", b"HELO"])
def test_commands_sent_before_the_ehlo_reply_end_the_session(relay: Site,
                                                             greeting: bytes) -> None:
    with raw(relay) as conn:
        conn.send(greeting + b" " + HELO.encode() + b"\r\nMAIL FROM:<slam@example.org>\r\n"
                  b"RCPT TO:<support@example.com>\r\n")
        code, lines = conn.reply()
        assert (code, enhanced(lines)) == (554, b"5.5.0"), lines
        assert conn.wait_closed() == b""


def test_message_sent_before_the_354_is_refused_and_not_stored(relay: Site) -> None:
    sender = f"slam-{uuid.uuid4().hex[:8]}@example.org"
    msg = make_mail("sent without waiting for the 354")
    group = (f"MAIL FROM:<{sender}>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n").encode()
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        conn.send(group + msg + b".\r\nQUIT\r\n")
        assert [conn.reply()[0] for _ in range(2)] == [250, 250]
        code, lines = conn.reply()
        assert (code, enhanced(lines)) == (554, b"5.5.0"), lines
        assert conn.wait_closed() == b""
    assert relay.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?", sender) == 0
    # The same group is fine when the client waits for the 354 (RFC 2920: DATA ends a group).
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        conn.send(group)
        assert [conn.reply()[0] for _ in range(3)] == [250, 250, 354]
        conn.send(msg + b".\r\n")
        assert conn.reply()[0] == 250
    assert relay.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?", sender) == 1


# --- open relay ------------------------------------------------------------------------------
# tests/test_smtp.py covers unknown domains, the plain percent hack, "user"@relay, source routes
# and <>; these are the other address forms a relay check can be fooled with.  Configured:
# support@, help@, støtte@, billing@example.com.


@pytest.mark.parametrize(
    ("sender", "rcpt", "code", "status"),
    [
        pytest.param("probe@example.org", "<example.org!victim>", 550, b"5.1.1",
                     id="bang-path"),
        pytest.param("probe@example.org", "<gmail.com!victim@example.com>", 550, b"5.1.1",
                     id="bang-path-via-our-domain"),
        pytest.param("probe@example.org", "<example.com!support>", 550, b"5.1.1",
                     id="bang-path-to-a-configured-local-part"),
        pytest.param("probe@example.org", "<victim%gmail.com@example.com>", 550, b"5.1.1",
                     id="percent-hack-via-our-domain"),
        pytest.param("probe@example.org", "<victim%gmail.com@[127.0.0.1]>", 550, b"5.1.1",
                     id="percent-hack-via-address-literal"),
        pytest.param("probe@example.org", "<@example.com:victim@gmail.com>", 550, b"5.1.1",
                     id="source-route-via-our-domain"),
        pytest.param("probe@example.org", '<"victim@gmail.com"@example.com>', 550, b"5.1.1",
                     id="quoted-foreign-address-at-our-domain"),
        pytest.param("probe@example.org", '<"victim%gmail.com"@example.com>', 550, b"5.1.1",
                     id="quoted-percent-hack"),
        # RFC 5321 section 4.1.2: "support" quoted is the same mailbox; delivered locally.
        pytest.param("probe@example.org", '<"support"@example.com>', 250, b"2.1.5",
                     id="quoted-configured-local-part"),
        pytest.param("probe@example.org", "<victim@gmail.com(support@example.com)>", 550,
                     b"5.1.1", id="comment-naming-a-configured-address"),
        pytest.param("probe@example.org", "<support@example.com>,<victim@gmail.com>", 501,
                     None, id="two-addresses"),
        pytest.param("probe@example.org", "<support@xn--exmple-cua.com>", 550, b"5.1.1",
                     id="punycode-domain"),
        pytest.param("probe@example.org", "<support@exämple.com>", 550, b"5.1.1",
                     id="utf8-domain"),
        pytest.param("probe@example.org", "<support@exаmple.com>", 550, b"5.1.1",  # Cyrillic а
                     id="homograph-domain"),
        pytest.param("probe@example.org", "<xn--sttte-wua@example.com>", 550, b"5.1.1",
                     id="punycoded-configured-local-part"),
        pytest.param("probe@example.org", "<support@example.com.>", 553, b"5.1.3",
                     id="trailing-dot"),
        pytest.param("probe@example.org", "<victim@gmail.com.>", 553, b"5.1.3",
                     id="trailing-dot-foreign"),
        pytest.param("probe@example.org", "<Victim@GMail.COM>", 550, b"5.1.1",
                     id="mixed-case-foreign"),
        pytest.param("probe@example.org", "<postmaster@[127.0.0.1]>", 550, b"5.1.1",
                     id="address-literal"),
        pytest.param("probe@example.org", "<support@[127.0.0.1]>", 550, b"5.1.1",
                     id="address-literal-configured-local-part"),
        pytest.param("probe@example.org", "<support@[IPv6:::1]>", 550, b"5.1.1",
                     id="ipv6-address-literal"),
        pytest.param("probe@example.org", "<postmaster@gmail.com>", 550, b"5.1.1",
                     id="foreign-postmaster"),
        pytest.param("probe@example.org", "<support>", 550, b"5.1.1", id="no-domain"),
        pytest.param("probe@example.org", "victim@gmail.com", 550, b"5.1.1",
                     id="no-angle-brackets"),
        pytest.param("probe@example.org", "<support@example.com\x00@gmail.com>", 553, b"5.1.3",
                     id="nul-byte"),
        pytest.param("", "<victim@gmail.com>", 550, b"5.1.1", id="null-sender"),
        pytest.param("support@example.com", "<victim@gmail.com>", 550, b"5.1.1",
                     id="our-own-address-as-sender"),
    ],
)
def test_not_an_open_relay_for_any_address_form(relay: Site, sender: str, rcpt: str, code: int,
                                                status: bytes | None) -> None:
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(f"MAIL FROM:<{sender}> SMTPUTF8".encode())[0] == 250
        got, lines = conn.cmd(b"RCPT TO:" + rcpt.encode())
        assert got == code, lines
        if status is not None:
            assert enhanced(lines) == status, lines


def test_relay_attempts_leave_nothing_to_deliver(relay: Site) -> None:
    foreign = [b"<victim@gmail.com>", b"<example.org!victim>", b"<victim%gmail.com@example.com>",
               b"<@example.com:victim@gmail.com>", b'<"victim@gmail.com"@example.com>',
               b"<postmaster@[127.0.0.1]>", b"<support@xn--exmple-cua.com>"]
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        conn.send(b"MAIL FROM:<relay-probe@example.org>\r\n"
                  + b"".join(b"RCPT TO:" + rcpt + b"\r\n" for rcpt in foreign))
        replies = [conn.reply()[0] for _ in range(len(foreign) + 1)]
        assert replies == [250] + [550] * len(foreign)
        assert conn.cmd(b"DATA")[0] == 503  # no recipient: nothing to send anywhere
    assert relay.count("SELECT count(*) FROM inbound_mails WHERE envelope_from = ?",
                       "relay-probe@example.org") == 0


# --- control characters ----------------------------------------------------------------------

INJECTED_HELO = "evil.example\rX-Helo-Injected: yes\x00\x1b[31m\x0b\x7f\u2028(end)"
RAW_CONTROLS = ("\r", "\x00", "\x1b", "\x0b", "\x7f", "\u2028")


def _stored_values(db_path: Path) -> Iterator[tuple[str, str, str | bytes]]:
    """Every text or blob value in every table of a site's database."""
    con = sqlite3.connect(db_path, timeout=30)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cursor = con.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cursor.description]
            for row in cursor:
                for name, value in zip(names, row, strict=True):
                    if isinstance(value, str | bytes):
                        yield table, name, value
    finally:
        con.close()


def test_control_characters_in_helo_are_stored_escaped(relay: Site,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """aiosmtpd ends command lines at LF only, so a bare CR, a NUL or an escape sequence in
    HELO reaches the listener; none may reach the stored mail or any column unescaped."""
    msg = make_mail("hostile HELO")
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + INJECTED_HELO.encode())[0] == 250
        (inbound_id,) = inbound_ids(send_mail(conn, "helo-injection@example.org", msg))
    row = relay.inbound(inbound_id)
    assert row["helo"] == ("evil.example\\x0dX-Helo-Injected: yes\\x00\\x1b[31m\\x0b\\x7f"
                           "\\u2028(end)")
    received, rest = strip_received(row["raw"])
    assert rest == msg
    # Not a domain: named in a comment, where it cannot pass for a host of the trace; the
    # escapes' backslashes and its parentheses are quoted-pairs there, so the comment holds.
    assert received.startswith(b"Received: from unknown ([127.0.0.1] helo=evil.example"
                               b"\\\\x0dX-Helo-Injected: yes\\\\x00"), received
    assert b"\\\\u2028\\(end\\))" in received
    # One header: its only line breaks are the folds, and no other control character is in it.
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]|\xe2\x80\xa8",
                         received.replace(b"\r\n\t", b"").removesuffix(b"\r\n")), received
    parsed = email.message_from_bytes(row["raw"])
    assert parsed["X-Helo-Injected"] is None
    assert len(parsed.get_all("Received") or []) == 1

    # Through the whole pipeline (in-process, on the site's database): no stored value in any
    # table carries the raw control characters.
    for name in [k for k in os.environ if k.startswith("TICKETGATE_")]:
        monkeypatch.delenv(name)
    from ingest.config import load_settings
    from ingest.service import Ingestor

    ingestor = Ingestor(load_settings(relay.config))
    try:
        assert ingestor.process(inbound_id).Action == "created"
    finally:
        ingestor.close()
    seen = []
    for table, column, value in _stored_values(relay.db_path):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if "X-Helo-Injected" in text:
            seen.append(f"{table}.{column}")
            bad = [c for c in RAW_CONTROLS if c in text.replace("\r\n", "")]
            assert not bad, (table, column, bad, text[:300])
    assert "inbound_mails.helo" in seen and "inbound_mails.raw" in seen, seen


def test_overlong_helo_is_stored_within_its_column(relay: Site) -> None:
    helo = "h" * 480 + ".example.net"  # under aiosmtpd's 512-byte command line
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + helo.encode())[0] == 250
        (inbound_id,) = inbound_ids(send_mail(conn, "long-helo@example.org",
                                              make_mail("long HELO")))
    assert relay.inbound(inbound_id)["helo"] == helo[:255]  # VARCHAR(255) on PostgreSQL


@pytest.mark.parametrize(
    "address",
    [
        pytest.param(b"<a\rb@example.org>", id="bare-CR"),
        pytest.param(b"<\x00a@example.org>", id="NUL"),
        pytest.param(b'<"a\\\x07b"@example.org>', id="quoted-pair-BEL"),
        pytest.param(b"<a\x7fb@example.org>", id="DEL"),
        pytest.param("<a\x85b@example.org>".encode(), id="NEL"),
        pytest.param("<a\u2028b@example.org>".encode(), id="line-separator"),
    ],
)
def test_mail_from_with_control_characters_is_refused(relay: Site, address: bytes) -> None:
    with raw(relay) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        code, lines = conn.cmd(b"MAIL FROM:" + address + b" SMTPUTF8")
        assert (code, enhanced(lines)) == (553, b"5.1.7"), lines
        assert conn.cmd(b"MAIL FROM:<fine@example.org>")[0] == 250  # the session goes on


def test_rcpt_with_control_characters_is_refused_even_by_a_catch_all(catchall: Site) -> None:
    with raw(catchall) as conn:
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        assert conn.cmd(b"MAIL FROM:<catchall@example.org>")[0] == 250
        for rcpt in (b"<a\rb@example.com>", b'<"sup\\\x07port"@example.com>',
                     b"<\x00@example.com>"):
            code, lines = conn.cmd(b"RCPT TO:" + rcpt)
            assert (code, enhanced(lines)) == (553, b"5.1.3"), (rcpt, lines)
        assert conn.cmd(b"RCPT TO:<anyone@anywhere.example>")[0] == 250
        assert conn.cmd(b"DATA")[0] == 354
        conn.send(make_mail("catch-all") + b".\r\n")
        code, lines = conn.reply()
        assert code == 250, lines
    row = catchall.inbound(inbound_ids(lines[0])[0])
    assert row["envelope_to"] == '["anyone@anywhere.example"]'


# --- the limiter itself (fake clock) --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_window_slides_and_refusals_are_not_counted() -> None:
    clock = Clock()
    limits = PeerLimits(max_connections_per_minute=3, max_messages_per_minute=2, clock=clock)
    key = limits.client_key(("192.0.2.7", 25))
    for _ in range(3):
        assert limits.connect(key) is None
        limits.disconnect(key)
        clock.now += 10
    assert (limits.connect(key) or "").startswith("421 4.7.0")  # 3 within the last 60 s
    clock.now = 1000.0 + 60.5  # the first one left the window, the refusal was not counted
    assert limits.connect(key) is None
    assert (limits.connect(key) or "").startswith("421 4.7.0")
    assert limits.message(key) and limits.message(key) and not limits.message(key)
    assert limits.connect(limits.client_key(("192.0.2.8", 25))) is None  # another client


def test_concurrent_limit_and_client_keys() -> None:
    limits = PeerLimits(max_connections=2)
    a = limits.client_key(("2001:db8:1:2::10", 25, 0, 0))
    b = limits.client_key(("2001:db8:1:2:ffff::1", 25, 0, 0))
    assert a == b == "2001:db8:1:2::/64"  # one IPv6 host owns its /64
    assert limits.client_key(("::ffff:192.0.2.1", 25, 0, 0)) == "192.0.2.1"
    assert limits.connect(a) is None and limits.connect(b) is None
    assert (limits.connect(a) or "").startswith("421 4.7.0 Too many connections")
    limits.disconnect(a)
    assert limits.connect(a) is None
    assert limits.client_key(("127.0.0.1", 25)) == "127.0.0.1"  # not exempt by default
    exempt = PeerLimits(max_connections=1, exempt_loopback=True)
    assert exempt.client_key(("127.0.0.9", 25)) is None
    assert exempt.client_key(("::1", 25, 0, 0)) is None
    assert exempt.client_key(("192.0.2.1", 25)) == "192.0.2.1"


def test_memory_is_bounded_by_the_clients_of_the_last_minute() -> None:
    clock = Clock()
    limits = PeerLimits(10, 10, 10, clock=clock)
    for n in range(5000):
        key = limits.client_key((f"10.0.{n // 250}.{n % 250}", 25))
        assert limits.connect(key) is None
        assert limits.message(key)
        limits.disconnect(key)
    assert limits.tracked() == 5000
    clock.now += 61
    limits.connect(limits.client_key(("192.0.2.1", 25)))
    assert limits.tracked() == 1


def test_production_defaults() -> None:
    smtp = SmtpSection()
    assert (smtp.max_connections_per_ip, smtp.max_connections_per_ip_per_minute,
            smtp.max_messages_per_ip_per_minute, smtp.max_bad_recipients) == (20, 120, 300, 10)
    assert smtp.greeting_delay == 1.0
    assert smtp.ip_limits_exempt_loopback is False


MiB = 1024 * 1024


def test_data_budget_waits_a_bounded_time_and_growth_never_waits() -> None:
    async def scenario() -> None:
        budget = DataBudget(8 * MiB, wait_seconds=0.2)
        held = await budget.reserve(6 * MiB)
        assert held is not None
        started = time.monotonic()
        assert await budget.reserve(4 * MiB) is None  # no room within 0.2 s: told 452
        assert 0.15 <= time.monotonic() - started < 2
        assert budget.used == 6 * MiB  # the refused wait left nothing behind
        small = await budget.reserve(256 * 1024)  # ordinary size fits: no wait
        assert small is not None
        assert small.cover(MiB)  # data past the reservation, covered while there is room
        assert budget.used == 6 * MiB + 256 * 1024 + MiB
        assert not small.cover(3 * MiB)  # no room: refused at once, nothing taken
        assert budget.used == 6 * MiB + 256 * 1024 + MiB
        small.release()
        later = asyncio.create_task(budget.reserve(4 * MiB))
        gone = asyncio.create_task(budget.reserve(4 * MiB))
        await asyncio.sleep(0.05)
        assert not later.done() and not gone.done()
        gone.cancel()  # a client that went away while waiting takes nothing
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        held.release()
        granted = await later
        assert granted is not None and budget.used == 4 * MiB
        granted.release()
        assert budget.used == 0

        # Ordinary size queued behind a large waiter is served as soon as it fits.
        first = await budget.reserve(4 * MiB)
        second = await budget.reserve(3 * MiB + 900 * 1024)
        assert first is not None and second is not None
        large = asyncio.create_task(budget.reserve(6 * MiB))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(budget.reserve(256 * 1024))  # no room, behind the large
        await asyncio.sleep(0.01)
        assert not large.done() and not queued.done()
        second.release()  # room for the small one, not for the large one
        small = await asyncio.wait_for(queued, 1)
        assert small is not None and not large.done()
        # Growth takes a whole step ahead when it is free, else just what is needed.
        assert first.cover(7 * MiB + 512 * 1024)
        assert first.cover(7 * MiB + 700 * 1024)  # 1 MiB more would not fit; 188 KiB does
        assert budget.used == 7 * MiB + 700 * 1024 + 256 * 1024
        first.release()
        ok = await asyncio.wait_for(large, 1)
        assert ok is not None
        small.release()
        ok.release()
        assert budget.used == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(("helo", "ip", "expected"), [
    ("mail.example.org", "192.0.2.1", "mail.example.org ([192.0.2.1])"),
    ("[192.0.2.1]", "192.0.2.1", "[192.0.2.1] ([192.0.2.1])"),
    ("client.example", "2001:db8::1", "client.example ([IPv6:2001:db8::1])"),
    (None, "192.0.2.1", "unknown ([192.0.2.1])"),
    ("a.example ([8.8.8.8]) by mx.google.com with ESMTPS id x; Tue, 1 Jan 2030",
     "192.0.2.1",
     "unknown ([192.0.2.1] helo=a.example \\([8.8.8.8]\\) by mx.google.com with ESMTPS id x;"
     " Tue, 1 Jan 2030)"),
])
def test_received_names_the_client_as_rfc_5321_writes_it(helo: str | None, ip: str,
                                                         expected: str) -> None:
    """A HELO that is not a domain or an address literal goes into a comment, so it cannot
    pass for a host and date of the trace; IPv6 clients are ``[IPv6:...]`` literals."""
    assert _received_from(helo, ip) == expected


@pytest.mark.parametrize(("fields", "message"), [
    ({"require_starttls": True}, "require_starttls needs tls_cert and tls_key"),
    ({"tls_cert": "/etc/ssl/mx.pem"}, "tls_cert is set but tls_key is not"),
    ({"tls_key": "/etc/ssl/mx.key"}, "tls_key is set but tls_cert is not"),
])
def test_half_a_tls_configuration_is_an_error(fields: dict[str, object], message: str) -> None:
    """It started the listener without TLS and without a word, so an operator who required
    STARTTLS took mail in plaintext."""
    with pytest.raises(ValidationError, match=message):
        SmtpSection.model_validate(fields)


POSTMASTER_WORLD = """
[[mailbox]]
id = 1
name = "Support"
addresses = ["help@a.example"]

[[mailbox]]
id = 7
name = "Operations"
addresses = ["ops@b.example"]
"""


def test_postmaster_goes_to_the_configured_mailbox(tmp_path: Path) -> None:
    config = tmp_path / "postmaster.toml"
    config.write_text("[smtp]\npostmaster_mailbox = 7\n" + POSTMASTER_WORLD, encoding="utf-8")
    settings = load_settings(config)
    for address in ("postmaster", "postmaster@a.example", "postmaster@b.example"):
        box = settings.mailbox_for_address(address)
        assert box is not None and box.id == 7, address
    for address in ("postmaster@c.example", "postmaster@[192.0.2.1]", "webmaster@a.example"):
        assert settings.mailbox_for_address(address) is None, address  # never a relay
    config.write_text(POSTMASTER_WORLD, encoding="utf-8")
    box = load_settings(config).mailbox_for_address("postmaster")
    assert box is not None and box.id == 1  # the first mailbox by default
    config.write_text("[smtp]\npostmaster_mailbox = 9\n" + POSTMASTER_WORLD, encoding="utf-8")
    with pytest.raises(ConfigError, match="postmaster_mailbox: no mailbox has id 9"):
        load_settings(config)


def test_refused_commands_carry_enhanced_status_codes(relay: Site) -> None:
    """RFC 3463 codes on aiosmtpd's own refusals too, as on every other reply of ours."""
    with raw(relay) as conn:
        got = [conn.cmd(b"MAIL FROM:<early@example.org>")]  # before EHLO
        assert conn.cmd(b"EHLO " + HELO.encode())[0] == 250
        got.append(conn.cmd(b"RCPT TO:<support@example.com>"))  # before MAIL
        got.append(conn.cmd(b"MAIL FROM:<a@example.org> BOGUS=1"))  # unknown parameter
        assert conn.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
        got.append(conn.cmd(b"MAIL FROM:<a@example.org>"))  # nested
        got.append(conn.cmd(b"DATA"))  # no recipient
        got.append(conn.cmd(b"RCPT"))  # no argument
        got.append(conn.cmd(b"FROBNICATE"))  # unknown command
    assert [(code, enhanced(lines)) for code, lines in got] == [
        (503, b"5.5.1"), (503, b"5.5.1"), (555, b"5.5.4"), (503, b"5.5.1"), (503, b"5.5.1"),
        (501, b"5.5.4"), (500, b"5.5.2")], got

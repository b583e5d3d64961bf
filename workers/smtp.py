"""The MX listener: aiosmtpd, RCPT checked against configured mailboxes, mail spooled before 250.

The order inside DATA is the whole point (design.md invariant 1): prepend a Received header,
write one spool record per mailbox in one transaction, and only then answer ``250``.  A database
failure answers ``451 4.3.0`` and writes nothing.  The broker is told afterwards; if it is down,
the sweep enqueues the record later, and the client still rightly got its 250.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import re
import secrets
import signal
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, ClassVar

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax
from sqlalchemy import Engine, event

from ingest.config import Settings
from ingest.errors import SpoolError
from ingest.service import Ingestor, SpoolRequest
from ingest.spool import Envelope as SpoolEnvelope
from workers.group_commit import GroupCommit

log = logging.getLogger("ticketgate.smtp")

# Upper bound of the trace headers' length (Return-Path and Received), apart from the
# configured hostname: MAIL FROM's address, HELO and the RCPT address are each under 512 bytes
# (aiosmtpd's command line limit; HELO is cut to 200 characters, escaped), the IP under 60,
# the fixed text and the date about 160.
RECEIVED_HEADER_RESERVE = 2560
# On SIGTERM, how long mails already in DATA may take to finish (below serve's grace time).
SHUTDOWN_DRAIN_SECONDS = 10.0
# Declared mail bytes (MAIL FROM's SIZE) that all sessions together may be receiving at once;
# DATA waits before its 354 while they are spent (see DataBudget).  A mail declaring no SIZE
# counts as UNDECLARED_SIZE.
DATA_BUDGET_BYTES = 32 * 1024 * 1024
UNDECLARED_SIZE = 256 * 1024
# A DATA waits at most this long for its reservation, then is answered 452 (well within the
# 2 minutes a client waits for the reply to DATA, RFC 5321 section 4.5.3.2).
DATA_BUDGET_WAIT_SECONDS = 60.0
# Data beyond a session's reservation is covered in steps of at least this much.
BUDGET_GROWTH_BYTES = 1024 * 1024
# A spool write larger than this closes its database connection afterwards instead of pooling
# it: libpq keeps its send buffer at the size of the largest message it sent, so each pooled
# connection that had carried a 20 MB mail held 20 MB for good.
LARGE_WRITE_BYTES = 1024 * 1024
_large_write = threading.local()
# Smaller mails are spooled by group commit: at most this many mails, and this many of their
# bytes, in one transaction.
GROUP_COMMIT_MAX_MAILS = 32
GROUP_COMMIT_MAX_BYTES = 4 * LARGE_WRITE_BYTES
# While the spool backlog is under [smtp] backlog_limit, MAIL reads the exact count from the
# database at most this often (see SpoolingHandler._backlog).
BACKLOG_REFRESH_SECONDS = 1.0
# C0 and C1 control characters (CR, LF, NUL, ESC, DEL, NEL...) and the Unicode line and
# paragraph separators: never stored unescaped, never accepted in an address.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A leading dot of a data line (the start of the data, or after CRLF), added by the client's
# dot-stuffing (RFC 5321 section 4.5.2).
_DOT_STUFFING = re.compile(rb"(?:^|(?<=\r\n))\.")


# Enhanced status codes (RFC 3463) for aiosmtpd's replies to commands it refuses: syntax
# error (command unrecognised, line too long), bad arguments, command not implemented or out
# of sequence.
_COMMAND_ERROR_CODES = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
                        "504": "5.5.4", "555": "5.5.4"}
_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


class PeerLimits:
    """Per-client limits of one listener process: concurrent connections, connections per
    minute, messages (accepted MAIL FROM) per minute.

    The counts live in this process's memory, so they are per listener: behind several MX
    listeners a client may get that many times the configured numbers.  Rates are a sliding
    window of 60 seconds (a log of the accepted events, at most ``limit`` per client, so memory
    is bounded by the limit times the clients seen within a minute); clients whose window is
    empty and that have no open connection are forgotten.  A client is an IPv4 address or an
    IPv6 /64 (one host usually owns a whole /64).  Refused connections and refused MAIL
    commands are not counted, so a client that backs off is served again within a minute.
    """

    WINDOW = 60.0

    def __init__(self, max_connections: int = 0, max_connections_per_minute: int = 0,
                 max_messages_per_minute: int = 0, exempt_loopback: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.max_connections_per_minute = max_connections_per_minute
        self.max_messages_per_minute = max_messages_per_minute
        self.exempt_loopback = exempt_loopback
        self.clock = clock
        self.open: dict[str, int] = {}
        self.connects: dict[str, deque[float]] = {}
        self.messages: dict[str, deque[float]] = {}
        self._last_sweep = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> PeerLimits:
        smtp = settings.smtp
        return cls(smtp.max_connections_per_ip, smtp.max_connections_per_ip_per_minute,
                   smtp.max_messages_per_ip_per_minute, smtp.ip_limits_exempt_loopback)

    def client_key(self, peer: Any) -> str | None:
        """What the limits count by; None for an exempt (loopback) client."""
        host = peer[0] if isinstance(peer, tuple) and peer else peer
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            return "unknown"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.exempt_loopback and ip.is_loopback:
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def connect(self, key: str | None) -> str | None:
        """Count a new connection of ``key``; the 421 reply instead when it is over a limit."""
        if key is None:
            return None
        now = self.clock()
        self._sweep(now)
        if self.max_connections and self.open.get(key, 0) >= self.max_connections:
            return "421 4.7.0 Too many connections from your address, try again later"
        if not self._take(self.connects, key, now, self.max_connections_per_minute):
            return "421 4.7.0 Too many connections from your address per minute, try again later"
        self.open[key] = self.open.get(key, 0) + 1
        return None

    def disconnect(self, key: str | None) -> None:
        if key is None:
            return
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    def message(self, key: str | None) -> bool:
        """Count one more message of ``key``; False when that is over the rate."""
        if key is None:
            return True
        return self._take(self.messages, key, self.clock(), self.max_messages_per_minute)

    def tracked(self) -> int:
        """How many clients are remembered (for tests: memory stays bounded)."""
        return len(set(self.open) | set(self.connects) | set(self.messages))

    def _take(self, table: dict[str, deque[float]], key: str, now: float, limit: int) -> bool:
        if not limit:
            return True
        log_ = table.get(key)
        if log_ is None:
            log_ = table[key] = deque()
        while log_ and log_[0] <= now - self.WINDOW:
            log_.popleft()
        if len(log_) >= limit:
            return False
        log_.append(now)
        return True

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.WINDOW:
            return
        self._last_sweep = now
        for table in (self.connects, self.messages):
            for key in [k for k, v in table.items() if not v or v[-1] <= now - self.WINDOW]:
                del table[key]


class DataBudget:
    """Bytes of mail the listener may be receiving at once, over all sessions.

    aiosmtpd kept a mail in memory about 3 times over while it arrived, and the spool write
    copies it again; fifty clients sending a 20 MB mail each took over 3 GB.  Here each DATA
    first reserves its declared size (MAIL FROM's SIZE, which MTAs send when SIZE is
    advertised; ``UNDECLARED_SIZE`` otherwise, and at most the whole budget) before its 354,
    and TCP flow control holds back the senders that wait.

    A declaration is only a claim: data beyond its reservation must be covered as it arrives
    (:meth:`Reservation.cover`), or the session keeps nothing more and is told ``452`` once
    the data has ended.  So thirty clients declaring ``SIZE=1`` and sending 20 MB each cannot
    take more memory than the budget (they took 700 MB), and no session ever waits in the
    middle of its data for another one, so none can deadlock.

    Waiting is bounded and cannot be held up by one sender: a reservation of ordinary size
    (up to ``UNDECLARED_SIZE``) is granted whenever it fits, even past larger ones waiting;
    larger ones are served in turn; and whoever has waited ``wait_seconds`` is told ``452``
    (the sender tries again later) rather than waiting behind a client that trickles a large
    mail for as long as its idle timeout allows.
    """

    def __init__(self, limit: int, wait_seconds: float = DATA_BUDGET_WAIT_SECONDS) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def reserve(self, size: int) -> Reservation | None:
        """Reserve ``size`` bytes (capped to the budget), waiting at most ``wait_seconds``;
        None if they could not be had by then."""
        size = max(0, min(size, self.limit))
        if self.used + size <= self.limit and (size <= UNDECLARED_SIZE or not self._waiting):
            self.used += size
            return Reservation(self, size)
        granted = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.wait_seconds)
        except TimeoutError:  # waited long enough: the sender tries again later
            self._abandon(entry)
            return None
        except asyncio.CancelledError:  # the client went away while waiting
            self._abandon(entry)
            raise
        return Reservation(self, size)

    def _abandon(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        size, granted = entry
        if granted.done() and not granted.cancelled():
            self.release(size)  # granted just as the wait ended
            return
        granted.cancel()
        with contextlib.suppress(ValueError):
            self._waiting.remove(entry)
        self._grant()  # a smaller one behind it may fit now

    def grow(self, extra: int) -> bool:
        """Take ``extra`` more bytes for a session already receiving, if they are free now."""
        if self.used + extra > self.limit:
            return False
        self.used += extra
        return True

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        """Serve the waiters in turn while they fit; past the first that does not, still serve
        those of ordinary size that fit, as a new one of that size would be."""
        blocked = False
        for entry in list(self._waiting):
            size, granted = entry
            if granted.done():  # cancelled, or timed out
                self._waiting.remove(entry)
                continue
            if self.used + size > self.limit or (blocked and size > UNDECLARED_SIZE):
                blocked = True
                continue
            self._waiting.remove(entry)
            self.used += size
            granted.set_result(None)


class Reservation:
    """One DATA's share of the :class:`DataBudget`."""

    def __init__(self, budget: DataBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def cover(self, total: int) -> bool:
        """Make the reservation cover ``total`` bytes; False if the budget has no room left
        for them (then the session must keep nothing more)."""
        if total <= self.size:
            return True
        needed = total - self.size
        for extra in (max(needed, BUDGET_GROWTH_BYTES), needed):  # a step ahead, or just enough
            if self.budget.grow(extra):
                self.size += extra
                return True
        return False

    def release(self) -> None:
        size, self.size = self.size, 0
        if size:
            self.budget.release(size)


def _has_long_line(block: bytes, start: int, limit: int) -> bool:
    """Whether a line that starts at or after ``start`` in ``block`` and ends in it (LF) is
    longer than ``limit``.  Each step jumps to the last LF within ``limit`` bytes, so a block
    of short lines takes a few steps per ``limit`` bytes, not one per line."""
    end = block.rfind(b"\n")
    while end - start > limit:
        brk = block.rfind(b"\n", start, start + limit + 1)
        if brk < 0:
            return True
        start = brk + 1
    return False


def declared_size(mail_options: list[str]) -> int | None:
    """The SIZE= parameter of MAIL FROM (RFC 1870), if the client declared one."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class TicketgateSMTP(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent sessions, and an idle timeout that is idle.

    aiosmtpd re-arms its timeout only when a *command* arrives, so a client that is busy
    streaming a large mail in DATA for longer than ``[smtp] timeout`` was cut off mid-transfer
    (and, retrying, could never deliver that mail).  Here, bytes arriving during DATA also count
    as activity.  Outside DATA the timer still runs per command, so a client sending junk lines
    cannot keep a session open forever.  On timeout the client is told ``421 4.4.2`` first.

    Hardening (``[smtp]``, see SECURITY.md): per-client connection and message limits
    (:class:`PeerLimits`); a greeting delay, input before the 220 is answered 554 and the client
    is disconnected; EHLO, HELO and DATA must end a pipelined group (RFC 2920 section 3.1), more
    input before their reply is answered 554 and disconnected; after ``max_bad_recipients``
    RCPTs answered 550/553 the next RCPT gets 421 and the session ends.
    """

    active_sessions: ClassVar[int] = 0
    live: ClassVar[set[TicketgateSMTP]] = set()
    max_sessions: ClassVar[int] = 200
    limits: ClassVar[PeerLimits] = PeerLimits()
    greeting_delay: ClassVar[float] = 0.0
    max_bad_recipients: ClassVar[int] = 0
    data_budget: DataBudget | None = None  # set by serve_smtp
    _client_key: str | None = None
    _counted: bool = False
    _bad_recipients: int = 0
    _last_reply: str = ""
    # Tolerate clients that end lines with a bare LF inside DATA (the terminator must still be
    # CRLF.CRLF, so SMTP smuggling stays impossible).
    line_length_limit = 64 * 1024

    # Some of aiosmtpd's own refusals carry no enhanced status code (RFC 3463); add it.
    _REPLY_REWRITES: ClassVar[dict[str, str]] = {
        "552 Error: Too much mail data": "552 5.3.4 Message too big for this system",
        "552 Error: message size exceeds fixed maximum message size":
            "552 5.3.4 Message size exceeds the fixed maximum",
        "530 Must issue a STARTTLS command first":
            "530 5.7.0 Must issue a STARTTLS command first",  # RFC 3207 section 4
    }

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = self._REPLY_REWRITES.get(status, status)
            code = status[:3]
            if code in _COMMAND_ERROR_CODES and not _ENHANCED.match(status):
                # aiosmtpd's own refusals of commands ("503 Error: need MAIL command", "501
                # Syntax: ..."): the enhanced code every other reply of ours carries.
                status = f"{code}{status[3:4] or ' '}{_COMMAND_ERROR_CODES[code]} {status[4:]}"
            self._last_reply = status
        await super().push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            refusal = None
            if TicketgateSMTP.active_sessions >= TicketgateSMTP.max_sessions:
                refusal = "421 4.3.2 Too many connections, try again later"
            else:
                peer = transport.get_extra_info("peername")
                self._client_key = self.limits.client_key(peer)
                refusal = self.limits.connect(self._client_key)
                if refusal is not None:
                    log.info("refused %r: %s", peer, refusal)
            if refusal is not None:
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                self._refused = True
                return
            self._counted = True
            TicketgateSMTP.active_sessions += 1
            TicketgateSMTP.live.add(self)
        self._refused = False
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if getattr(self, "_refused", False):
            return
        if self._counted:
            self._counted = False
            self.limits.disconnect(self._client_key)
        TicketgateSMTP.active_sessions = max(0, TicketgateSMTP.active_sessions - 1)
        TicketgateSMTP.live.discard(self)
        super().connection_lost(error)

    def allow_message(self) -> bool:
        """Count a new transaction (MAIL FROM) against the client's message rate."""
        return self.limits.message(self._client_key)

    def _pending_input(self) -> int:
        """Bytes the client sent that no command has read yet."""
        return len(getattr(self._reader, "_buffer", b""))

    async def _hang_up(self, reply: str) -> None:
        """Answer ``reply`` and end the session; whatever else the client sent is not run."""
        buffer = getattr(self._reader, "_buffer", None)
        if buffer is not None:
            buffer.clear()
        with contextlib.suppress(ConnectionError):
            await self.push(reply)
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _handle_client(self) -> None:
        """Wait ``greeting_delay`` before the 220: a client that talks first is not an MTA
        (RFC 5321 section 3.1: the client waits for the greeting), it is told 554 and dropped."""
        if self.greeting_delay > 0:
            await asyncio.sleep(self.greeting_delay)
        if self._pending_input():
            log.info("%r sent data before the greeting: rejected", self.session.peer)
            await self._hang_up("554 5.5.0 Protocol error: data sent before the greeting")
            return
        await super()._handle_client()

    async def _out_of_sync(self, command: str) -> bool:
        """RFC 2920 section 3.1: EHLO, HELO and DATA can only be the last command of a pipelined
        group.  Input already waiting when their reply is due was sent without waiting for it
        (for DATA: the message before the 354), which no conforming client does; the session
        ends with 554 instead of running what a spam bot queued blindly."""
        if not self._pending_input():
            return False
        log.info("%r sent data before the reply to %s: rejected", self.session.peer, command)
        await self._hang_up("554 5.5.0 Error: SMTP protocol synchronization")
        return True

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._out_of_sync("HELO"):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._out_of_sync("EHLO"):
            await super().smtp_EHLO(hostname)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """No STARTTLS inside TLS (RFC 3207 section 4.2).  aiosmtpd answered 220 and then
        failed its handshake on top of the first one: the session died and each try logged a
        traceback."""
        if self._tls_protocol is not None:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """After ``max_bad_recipients`` RCPTs refused as unknown or malformed, the next RCPT
        ends the session with 421: a dictionary attack learns little per connection."""
        if 0 < self.max_bad_recipients <= self._bad_recipients:
            log.info("%r: %d invalid recipients, closing", self.session.peer,
                     self._bad_recipients)
            await self._hang_up("421 4.7.0 Too many invalid recipients, closing connection")
            return
        self._last_reply = ""
        await super().smtp_RCPT(arg)
        if self._last_reply[:3] in ("550", "553"):
            self._bad_recipients += 1

    _in_data: bool = False

    @syntax("DATA")  # keeps HELP DATA working
    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd answers it, but the content is read in blocks into one buffer.

        aiosmtpd reads DATA line by line and keeps a list of one bytearray per line, about
        twice the mail in memory and a Python loop turn per line; and a client that ends its
        lines with bare LF sends one "line" the size of the mail, refused past the stream limit.
        Here the reader's own search finds the end (CRLF.CRLF only, so SMTP smuggling with
        ``<LF>.<LF>`` stays impossible) and never reads past it: pipelined commands after the
        data stay in the reader.  The line rules are unchanged: a line (ended by LF or CRLF)
        longer than ``line_length_limit`` is answered 500, data over the size limit 552, both
        after the whole data has been read (RFC 5321 section 4.2.5), and a leading dot is
        removed from every line after CRLF (section 4.5.2).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if await self._out_of_sync("DATA"):
            return
        reservation = None
        if self.data_budget is not None:
            size = declared_size(self.envelope.mail_options)
            reservation = await self.data_budget.reserve(
                UNDECLARED_SIZE if size is None else size)
            self._reset_timeout()  # waiting for the budget is not the client's idleness
            if reservation is None:
                self._set_post_data_state()
                await self.push("452 4.3.1 Insufficient system storage, try again later")
                return
        self._in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                content, refusal = await self._read_data(reservation)
            except asyncio.IncompleteReadError:  # the client went away mid-DATA: nothing kept
                log.info("connection lost during DATA")
                self._writer.close()
                return
            if refusal is not None:
                self._set_post_data_state()
                await self.push(refusal)
                return
            self.envelope.content = content
            self.envelope.original_content = content
            del content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self._in_data = False
            if reservation is not None:
                reservation.release()

    async def _read_data(self, reservation: Reservation | None = None
                         ) -> tuple[bytes | bytearray, str | None]:
        """The data up to CRLF.CRLF, unstuffed; or a refusal once all of it has been read.

        The reader is searched for ``.<CRLF>``, the end of the terminator (its CRLF before may
        be the end of the DATA line, read already); a match ends the data when the two bytes
        before it are CRLF.  A stretch without one arrives in blocks of the reader's limit.
        What is kept must stay covered by ``reservation``.
        """
        reader = self._reader
        size_limit = self.data_size_limit
        line_limit = self.line_length_limit
        kept = bytearray()
        recent = b"\r\n"  # the last bytes seen, from the CRLF that ended the DATA line
        received = 0
        open_line = 0  # length of the line not yet ended at the end of what was read
        too_much = too_long = no_room = False
        while True:
            try:
                block = await reader.readuntil(b".\r\n")
                matched = True
            except asyncio.LimitOverrunError as overrun:
                block = await reader.readexactly(overrun.consumed)
                matched = False
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            recent = (recent + block[-5:])[-5:]
            ended = matched and recent == b"\r\n.\r\n"
            if ended:
                block = block[:-3]  # ".\r\n" ends the data; it is not part of it
            received += len(block)
            first_break = block.find(b"\n")
            first_line = open_line + (len(block) if first_break < 0 else first_break)
            if first_line > line_limit or (
                    first_break >= 0 and _has_long_line(block, first_break + 1, line_limit)):
                too_long = True
            last_break = block.rfind(b"\n")
            open_line = open_line + len(block) if last_break < 0 else len(block) - last_break - 1
            if size_limit and received > size_limit:
                too_much = True
            refused = too_much or too_long
            if reservation is not None and not refused and not no_room and (
                    not reservation.cover(received)):
                no_room = True  # refused data is read to its end, but takes no room
            if refused or no_room:
                kept.clear()  # keep nothing of refused data, but read it to its end
            else:
                kept += block
            if ended:
                break
        if too_long:
            return b"", "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
        if too_much:
            return b"", "552 Error: Too much mail data"
        if no_room:
            log.warning("%r: data past its declared size and no room left; answered 452",
                        self.session.peer)
            return b"", "452 4.3.1 Insufficient system storage, try again later"
        if kept.startswith(b".") or b"\r\n." in kept:
            return _DOT_STUFFING.sub(b"", kept), None
        return kept, None  # not copied to bytes: a 20 MB mail would be held twice

    def data_received(self, data: bytes) -> None:
        if self._in_data:
            self._reset_timeout()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(b"421 4.4.2 Idle timeout, closing connection\r\n")
        super()._timeout_cb()

    def close_with(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(reply)
            self.transport.close()

    @classmethod
    async def drain(cls, timeout: float) -> None:
        """On shutdown: let transactions in DATA finish (the client gets its 250), tell every
        other session ``421`` and close it; after ``timeout`` close whatever is left.

        Before, SIGTERM dropped every open session without a word, even one whose mail was
        being spooled (stored, but the client never saw the 250 and sent it again).  It also
        keeps ``Server.wait_closed()`` from waiting on idle clients (Python >= 3.12 waits for
        all connections).
        """
        bye = b"421 4.3.2 Service shutting down, try again later\r\n"
        deadline = asyncio.get_running_loop().time() + timeout
        while cls.live and asyncio.get_running_loop().time() < deadline:
            for session in list(cls.live):
                if not session._in_data:
                    session.close_with(bye)
            await asyncio.sleep(0.05)
        for session in list(cls.live):
            session.close_with(bye)


class SpoolingHandler:
    """aiosmtpd handler: RCPT by mailbox address; DATA spools, enqueues, answers."""

    def __init__(self, ingestor: Ingestor, enqueue: Any) -> None:
        self.ingestor = ingestor
        self.settings: Settings = ingestor.settings
        self.enqueue = enqueue
        self._backlog_count = 0  # the backlog as last read from the database
        self._backlog_read_at = float("-inf")  # when (time.monotonic())
        self._spooled_since_read = 0  # records this listener spooled since then
        # Mails up to LARGE_WRITE_BYTES share their spool transactions (workers/group_commit.py).
        self.group_commit: GroupCommit[SpoolRequest, list[int]] = GroupCommit(
            self._spool_group_and_enqueue, max_items=GROUP_COMMIT_MAX_MAILS,
            max_bytes=GROUP_COMMIT_MAX_BYTES)

    async def _backlog(self) -> int:
        """The spool backlog for MAIL's check, without a COUNT query for every mail.

        Workers only shrink the backlog, so the count last read plus what this listener spooled
        since is an upper bound of it.  While that bound is under the limit, and for at most
        ``BACKLOG_REFRESH_SECONDS``, it is the answer; otherwise the exact count is read, so a
        mail is never deferred on an estimate.  (Other doors' and listeners' mails count from
        the next read.)  The query per MAIL was a fifth of the listener's CPU.
        """
        estimate = self._backlog_count + self._spooled_since_read
        if (estimate < self.settings.smtp.backlog_limit
                and time.monotonic() - self._backlog_read_at < BACKLOG_REFRESH_SECONDS):
            return estimate
        read_at = time.monotonic()
        count = await asyncio.to_thread(self.ingestor.backlog)
        self._backlog_count, self._backlog_read_at, self._spooled_since_read = count, read_at, 0
        return count

    def _spool_and_enqueue(self, raw: bytes, mailboxes: list[int], source: str,
                           envelope: SpoolEnvelope) -> list[int]:
        """Spool (committed), then hand the ids to the broker: one thread hop, not two."""
        _large_write.active = len(raw) > LARGE_WRITE_BYTES
        try:
            ids: list[int] = self.ingestor.receive_many(raw, mailboxes, "smtp", source,
                                                        envelope)
        finally:
            _large_write.active = False
        self.enqueue(ids)
        return ids

    def _spool_group_and_enqueue(self, requests: list[SpoolRequest]
                                 ) -> list[list[int] | SpoolError]:
        """The group commit's write: the group's mails in one transaction, then their ids to
        the broker at once."""
        results = self.ingestor.receive_group(requests, "smtp")
        ids = [i for result in results if not isinstance(result, SpoolError) for i in result]
        if ids:
            self.enqueue(ids)
        return results

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Advertise PIPELINING (RFC 2920).  aiosmtpd handles pipelined commands correctly (it
        reads and answers one line at a time, in order) but does not say so, so well-behaved
        clients never pipelined.  Also drop aiosmtpd's ``AUTH`` line: after STARTTLS it was
        advertised with no mechanism at all (an MX takes no logins).  A 5-argument hook must
        set ``host_name`` itself."""
        session.host_name = hostname
        kept = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")]
        return [*kept, "250-PIPELINING", responses[-1]]

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected failure is our problem, not the client's: answer a temporary 451 (the
        sender retries) instead of aiosmtpd's default ``500 Error: (Type) text``, which made
        senders bounce the mail and leaked internal error text."""
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        return "451 4.3.0 Temporary local problem, try again later"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not _valid_utf8(address):
            # With SMTPUTF8 on, aiosmtpd decodes with surrogateescape; such a string cannot be
            # stored (the spool write raised UnicodeEncodeError and the client got a 500).
            return "553 5.1.7 Sender address is not valid UTF-8"
        if _CONTROL.search(address):
            # No address may hold one (RFC 5321 section 4.1.2); stored, a CR or NUL could
            # forge header lines or break PostgreSQL.  aiosmtpd splits lines at LF only, so a
            # bare CR does arrive here.
            return "553 5.1.7 Sender address contains control characters"
        backlog = await self._backlog()
        if backlog >= self.settings.smtp.backlog_limit:
            log.warning("backlog %d >= %d: deferring new mail", backlog,
                        self.settings.smtp.backlog_limit)
            return "451 4.3.2 Too much mail waiting to be processed, try again later"
        allow_message = getattr(server, "allow_message", None)
        if allow_message is not None and not allow_message():
            log.info("%r over the message rate: deferring", session.peer)
            return "451 4.7.1 Too many messages from your address, try again later"
        envelope.mail_from = address  # "<>" for the null sender: aiosmtpd needs it non-empty
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not _valid_utf8(address):
            return "553 5.1.3 Recipient address is not valid UTF-8"
        if _CONTROL.search(address):  # matters where a mailbox has accept_any (the demo)
            return "553 5.1.3 Recipient address contains control characters"
        if len(envelope.rcpt_tos) >= self.settings.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        if self.settings.mailbox_for_address(_bare(address)) is None:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        mailboxes: list[int] = []
        for rcpt in envelope.rcpt_tos:
            box = self.settings.mailbox_for_address(_bare(rcpt))
            if box is not None and box.id not in mailboxes:
                mailboxes.append(box.id)
        queue_id = secrets.token_hex(6)
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        reverse_path = _reverse_path(envelope.mail_from or "")
        raw = (_return_path_header(reverse_path)
               + self._received_header(session, envelope, peer_ip, queue_id) + content)
        # From here on the stored bytes are the only copy the listener holds.
        del content
        envelope.content = envelope.original_content = None
        spool_envelope = SpoolEnvelope(mail_from=reverse_path,
                                       rcpt_to=list(envelope.rcpt_tos),
                                       client_ip=peer_ip, helo=_stored_helo(session.host_name))
        source = f"smtp {peer_ip} {queue_id}"
        try:
            if len(raw) > LARGE_WRITE_BYTES:  # alone, on a connection closed afterwards
                ids = await asyncio.to_thread(self._spool_and_enqueue, raw, mailboxes, source,
                                              spool_envelope)
            else:
                ids = await self.group_commit.submit(
                    SpoolRequest(raw, mailboxes, source, spool_envelope), len(raw))
        except SpoolError as exc:
            log.error("spool failed for %s from %s: %s", queue_id, peer_ip, exc)
            return "451 4.3.0 Temporary failure storing the message, try again later"
        self._spooled_since_read += len(ids)
        log.info("accepted %s from %s as inbound %s (%d bytes)", queue_id, peer_ip, ids,
                 len(raw))
        return f"250 2.0.0 Ok: queued as {queue_id} inbound {','.join(map(str, ids))}"

    def _received_header(self, session: Session, envelope: Envelope, peer_ip: str,
                         queue_id: str) -> bytes:
        """The trace line of RFC 5321 section 4.4, with the protocol names of RFC 3848 and
        RFC 6531 (``UTF8SMTPS`` for a transaction with SMTPUTF8 over TLS)."""
        protocol = "ESMTP" if session.extended_smtp or session.ssl else "SMTP"  # STARTTLS: EHLO
        if getattr(envelope, "smtp_utf8", False):
            protocol = "UTF8SMTP"
        if session.ssl:
            protocol += "S"
        rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        header = (
            f"Received: from {_received_from(session.host_name, peer_ip)}\r\n"
            f"\tby {self.settings.smtp.hostname} (ticketgate) with {protocol} id {queue_id}"
            + (f"\r\n\tfor <{_bare(rcpt)}>" if rcpt else "")
            + f"; {formatdate(usegmt=True)}\r\n"
        )
        return header.encode("utf-8", "replace")


def _reverse_path(address: str) -> str:
    """MAIL FROM's address without its angle brackets; ``""`` for the null sender ``<>``,
    which aiosmtpd passes on as the string ``"<>"`` (stored so, a bounce's sender became the
    address ``<>``)."""
    return address.strip().removeprefix("<").removesuffix(">").strip()


def _return_path_header(reverse_path: str) -> bytes:
    """The ``Return-Path`` that final delivery adds (RFC 5321 section 4.4): the envelope
    sender, ``<>`` for a bounce.  Bounce and auto-reply detection reads it, as it does in mail
    fetched over IMAP, where the delivering MTA added it; without it, a bounce sent to the
    listener with ``MAIL FROM:<>`` opened a ticket."""
    return f"Return-Path: <{reverse_path}>\r\n".encode()


# A HELO argument that RFC 5321 allows in a Received line's From-domain: a domain, or an
# address literal.  Anything else is written as a comment.
_HELO_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")
_HELO_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]")


def _received_from(helo: str | None, peer_ip: str) -> str:
    """``helo ([ip])`` when HELO is a domain or an address literal; otherwise ``unknown
    ([ip] helo=...)`` with HELO in a comment, so that a client cannot write a second host and
    date into our own trace line (``EHLO a.example ([8.8.8.8]) by mx.google.com ...``).  IPv6
    addresses are written as RFC 5321 literals, ``[IPv6:...]``."""
    ip = peer_ip.split("%", 1)[0]
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    name = _escape_controls(_text(helo) or "")[:200]
    if name and (_HELO_DOMAIN.fullmatch(name) or _HELO_LITERAL.fullmatch(name)):
        return f"{name} ({literal})"
    if not name:
        return f"unknown ({literal})"
    quoted = re.sub(r"([()\\])", r"\\\1", name[:100])  # quoted-pairs keep it closed
    return f"unknown ({literal} helo={quoted})"


def _bare(address: str) -> str:
    return address.strip().strip("<>").strip().lower()


def _valid_utf8(text: str) -> bool:
    """False for strings aiosmtpd decoded from invalid UTF-8 (they hold lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: str | None) -> str | None:
    """A storable string: invalid UTF-8 (e.g. in HELO) becomes U+FFFD instead of failing."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _escape_controls(text: str) -> str:
    """``text`` with each control character written as a visible escape (CR as ``\\x0d``).

    HELO is accepted as sent (it is only informational), but a bare CR, a NUL or an escape
    sequence in it must not start a new header line in the stored mail, end up in a
    database column (PostgreSQL refuses NUL) or reach a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", text)


def _stored_helo(value: str | None) -> str | None:
    """HELO as stored in ``inbound_mails.helo``: valid UTF-8, escaped, within its 255
    characters (a longer one made the row fail on PostgreSQL)."""
    if value is None:
        return None
    return _escape_controls(_text(value) or "")[:255]


def data_size_limit(settings: Settings) -> int:
    """The SIZE advertised and enforced for DATA: ``max_message_bytes`` minus room for the
    Received header prepended before spooling.

    The pipeline refuses a stored mail longer than ``max_message_bytes``.  Advertising that same
    number made a mail within a few hundred bytes of the limit get a 250 (so the sender
    considers it delivered) and then be recorded as "rejected: too large" instead of becoming a
    ticket.  The header's length is bounded (see ``RECEIVED_HEADER_RESERVE``).
    """
    reserve = RECEIVED_HEADER_RESERVE + len(settings.smtp.hostname.encode("utf-8"))
    return max(1, settings.service.max_message_bytes - reserve)


def _close_after_large_write(dbapi_connection: Any, record: Any) -> None:
    """Pool ``checkin`` hook: a connection that just stored a large mail (in this thread) is
    closed rather than kept with its grown buffers; the pool opens a new one when needed."""
    if getattr(_large_write, "active", False) and record is not None:
        record.invalidate()


def _limit_memory(engine: Engine) -> None:
    """Keep memory that large mails used from staying with the listener after they are stored.

    Besides closing the connections that carried them, glibc's malloc must not move its mmap
    threshold up: after a 20 MB block is freed it would serve the next ones from the heap, and
    heap memory stays with the process.  (No-op where that is not glibc.)"""
    if not event.contains(engine, "checkin", _close_after_large_write):
        event.listen(engine, "checkin", _close_after_large_write)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD: fixed, 1 MiB


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = settings.smtp.tls_cert, settings.smtp.tls_key
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


async def serve_smtp(ingestor: Ingestor, enqueue: Any, *, host: str | None = None,
                     port: int | None = None, stop: asyncio.Event | None = None) -> None:
    """Listen until ``stop`` is set (or SIGTERM/SIGINT), then stop accepting and return."""
    settings = ingestor.settings
    handler = SpoolingHandler(ingestor, enqueue)
    context = tls_context(settings)
    TicketgateSMTP.max_sessions = settings.smtp.max_sessions
    TicketgateSMTP.limits = PeerLimits.from_settings(settings)
    TicketgateSMTP.greeting_delay = settings.smtp.greeting_delay
    TicketgateSMTP.max_bad_recipients = settings.smtp.max_bad_recipients
    # Room for the largest mail the listener takes, however large max_message_bytes is (a
    # reservation is capped at the budget); the wait for room ends before the idle timeout.
    budget = DataBudget(max(DATA_BUDGET_BYTES, data_size_limit(settings)),
                        wait_seconds=min(DATA_BUDGET_WAIT_SECONDS, settings.smtp.timeout / 2))
    _limit_memory(ingestor.engine)

    def factory() -> SMTP:
        session = TicketgateSMTP(
            handler,
            hostname=settings.smtp.hostname,
            ident="ticketgate ESMTP",
            data_size_limit=data_size_limit(settings),
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=context,
            require_starttls=settings.smtp.require_starttls,  # with TLS: the config checks
            timeout=settings.smtp.timeout,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],  # an MX takes no logins
        )
        session.data_budget = budget
        return session

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host or settings.smtp_host,
                                      port or settings.smtp_port)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    bound = ", ".join(str(s.getsockname()) for s in server.sockets)
    log.info("SMTP listening on %s", bound)
    print(f"ticketgate smtp listening on {bound}", flush=True)
    await stop.wait()
    server.close()
    await TicketgateSMTP.drain(SHUTDOWN_DRAIN_SECONDS)
    await server.wait_closed()
    log.info("SMTP stopped")

"""The IMAP poller (``ticketgate imap``): one thread per mailbox that has an ``imap`` table.

One pass over a folder, in this order, because the order is the promise (design.md invariant 1):

    SELECT            UIDVALIDITY compared with the stored one (changed: synchronise from scratch)
    UID SEARCH        UIDs above the stored ``last_uid`` (never sequence numbers)
    UID FETCH         RFC822.SIZE first; a mail over the limit is never downloaded, it is recorded
                      ``rejected`` with the reason and left (or moved) on the server
    UID FETCH         BODY.PEEK[] in batches bounded by count and bytes (PEEK: fetching never
                      sets \\Seen)
    spool             one commit per batch (Ingestor.receive_batch)
    enqueue           the new inbound ids go to the workers
    acknowledge       \\Seen, or MOVE (COPY + \\Deleted + UID EXPUNGE without MOVE), or delete
    last_uid saved    only now

A crash anywhere before "acknowledge" leaves the mail on the server as it was, so the next pass
fetches it again; ``receive_batch`` recognises the same source (account, folder, UIDVALIDITY, UID)
and hands back the existing record (enqueued again if still unprocessed) instead of spooling a
second one, and the pipeline's idempotency key (Message-ID + mailbox) covers every other way a
mail can come twice.  A crash after "acknowledge" and before "last_uid saved" is the same case in
"seen" mode (fetched again, recognised, flagged again); moved or deleted mail is simply gone.

Between passes the thread waits in IDLE when the server has it (new mail within a second or two),
else sleeps ``poll_interval``.  Every failure (network, TLS, login, server) is logged, stored on
the folder's state row, and retried with exponential backoff and jitter; a thread never dies of
it, and one broken mailbox never holds up another.  TLS is always verified; STARTTLS that fails
or is not offered ends the attempt before any password is sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import shlex
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from imapclient import DELETED, SEEN, IMAPClient, SocketTimeout
from imapclient.exceptions import LoginError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ingest.config import ImapSettings, Mailbox
from ingest.models import ImapFolderState, utcnow
from ingest.service import Ingestor

log = logging.getLogger("ticketgate.imap")

Enqueue = Callable[[list[int]], object]

# UIDs per RFC822.SIZE fetch (the plan for the next batches).  imapclient sends FETCH with a
# comma-separated UID list, so this also keeps command lines near RFC 7162's advice (8 KB).
SIZE_WINDOW = 500
PROGRESS_EVERY = 1000  # log a backlog's progress this often (and at least every 5 s)
HEAD_ITEM = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID DATE FROM TO CC SUBJECT)]"
DOOR = "imap"


class ImapError(Exception):
    """Anything that ends one connection; the poller logs it, stores it, and tries again."""


class ImapAuthError(ImapError):
    """The server refused the credentials (or they could not be read): retried, but slowly."""


class ImapTLSError(ImapError):
    """Certificate not trusted, handshake failed, or STARTTLS missing: nothing was sent."""


class ConnectionLost(ImapError):
    """The server closed the connection (e.g. while idling)."""


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``base * 2**n`` capped, then drawn from [d/2, d]."""

    base: float = 1.0
    cap: float = 300.0
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class FolderState:
    uidvalidity: int | None
    last_uid: int
    account: str
    last_success_at: dt.datetime | None = None


def uid_set(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1:3,7,9:10"`` (short commands for long UID lists)."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


def plan_batches(uids: Sequence[int], sizes: dict[int, int], max_count: int, max_bytes: int
                 ) -> Iterator[list[int]]:
    """Consecutive groups of at most ``max_count`` mails and about ``max_bytes`` (a mail larger
    than that goes alone), so memory stays bounded whatever the backlog."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= max_count or total + size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def tls_context(cfg: ImapSettings) -> ssl.SSLContext:
    """Verified TLS: the system's CAs, or only ``ca_file`` (a private CA) when it is given."""
    context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ImapPoller:
    """Polls one mailbox's folder until ``stop`` is set (run it in its own thread)."""

    def __init__(self, ingestor: Ingestor, mailbox: Mailbox, enqueue: Enqueue,
                 stop: threading.Event | None = None, *, backoff: Backoff | None = None,
                 auth_backoff: Backoff | None = None, idle_tick: float = 1.0,
                 idle_renew: float = 300.0) -> None:
        if mailbox.imap is None:
            raise ValueError(f"mailbox {mailbox.id} has no imap settings")
        self.ingestor = ingestor
        self.mailbox = mailbox
        self.cfg: ImapSettings = mailbox.imap
        self.enqueue = enqueue
        self.stop = stop or threading.Event()
        self.backoff = backoff or Backoff(1.0, 300.0)
        # A refused login does not fix itself in seconds, and hammering it can lock the account.
        self.auth_backoff = auth_backoff or Backoff(60.0, 1800.0)
        self.idle_tick = idle_tick
        self.idle_renew = idle_renew  # RFC 2177: re-issue IDLE well before 29 minutes
        self.limit = self.cfg.max_message_bytes or ingestor.settings.service.max_message_bytes
        self.client: IMAPClient | None = None
        self.name = f"mailbox {mailbox.id} ({mailbox.name}) {self.cfg.account}/{self.cfg.folder}"
        self.thread: threading.Thread | None = None

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=f"imap-{self.mailbox.id}",
                                       daemon=True)
        self.thread.start()
        return self.thread

    def run(self) -> None:
        """Connect, synchronise, wait for news, again; on any failure log, store, back off."""
        while not self.stop.is_set():
            try:
                self.connect()
                self.serve()
            except ImapAuthError as exc:
                delay = self.auth_backoff.next_delay()
                self._failed(f"login failed: {exc}", delay, logging.ERROR)
            except ImapTLSError as exc:
                delay = self.backoff.next_delay()
                self._failed(f"TLS refused, not continuing without it: {exc}", delay,
                             logging.ERROR)
            except Exception as exc:  # network, server, database: all retried
                delay = self.backoff.next_delay()
                self._failed(f"{type(exc).__name__}: {exc}", delay, logging.WARNING)
            else:
                self.disconnect(graceful=True)  # stopped
                return
            self.disconnect(graceful=False)
            self.stop.wait(delay)

    def _failed(self, message: str, delay: float, level: int) -> None:
        log.log(level, "%s: %s; retrying in %.1fs", self.name, message, delay)
        try:
            self._save_state(last_error=message[:4000], last_error_at=utcnow())
        except Exception as exc:  # the database may be the thing that is down
            log.warning("%s: could not store the error: %s", self.name, exc)

    def serve(self) -> None:
        """Synchronise, then IDLE (or sleep) until there is news, until stopped."""
        assert self.client is not None
        use_idle = self.cfg.idle and self.client.has_capability("IDLE")
        if self.cfg.idle and not use_idle:
            log.info("%s: server has no IDLE; polling every %ss", self.name,
                     self.cfg.poll_interval)
        while not self.stop.is_set():
            self.sync()
            self.backoff.reset()
            self.auth_backoff.reset()
            if self.stop.is_set():
                break
            if use_idle:
                self.idle()
            else:
                self.stop.wait(self.cfg.poll_interval)

    # --- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        cfg = self.cfg
        timeout = SocketTimeout(connect=min(cfg.timeout, 30.0), read=cfg.timeout)
        context = tls_context(cfg) if cfg.tls != "none" else None
        try:
            if cfg.tls == "ssl":
                client = IMAPClient(cfg.host, cfg.port, ssl=True, ssl_context=context,
                                    timeout=timeout)
            else:
                client = IMAPClient(cfg.host, cfg.port, ssl=False, timeout=timeout)
        except ssl.SSLError as exc:
            raise ImapTLSError(f"TLS handshake with {cfg.host}:{cfg.port} failed: {exc}") from exc
        client.normalise_times = False  # INTERNALDATE with the server's offset, not local time
        self.client = client
        if cfg.tls == "starttls":
            if not client.has_capability("STARTTLS"):
                raise ImapTLSError(f"{cfg.host}:{cfg.port} does not offer STARTTLS")
            try:
                client.starttls(context)
            except (ssl.SSLError, OSError) as exc:
                raise ImapTLSError(f"STARTTLS with {cfg.host}:{cfg.port} failed: {exc}") from exc
            except Exception as exc:  # the server answered NO/BAD to STARTTLS
                raise ImapTLSError(f"STARTTLS refused by {cfg.host}:{cfg.port}: {exc}") from exc
        self.login()
        for target in (cfg.move_to, cfg.oversized_move_to):
            if target and not client.folder_exists(target):
                client.create_folder(target)
                log.info("%s: created folder %r", self.name, target)
        log.info("%s: connected (%s)", self.name,
                 "TLS" if cfg.tls != "none" else "plaintext on loopback")

    def login(self) -> None:
        assert self.client is not None
        cfg = self.cfg
        try:
            if cfg.oauth2 is not None:
                self.client.oauth2_login(cfg.user, self._oauth2_token())
            else:
                self.client.login(cfg.user, self._password())
        except LoginError as exc:
            text = str(exc)
            if "UNAVAILABLE" in text.upper():  # RFC 5530: the server's problem, not ours
                raise ImapError(f"login temporarily unavailable: {text}") from exc
            raise ImapAuthError(
                f"{cfg.host}:{cfg.port} refused {'XOAUTH2' if cfg.oauth2 else 'the password'} "
                f"for user {cfg.user!r}: {text}") from exc

    def _password(self) -> str:
        cfg = self.cfg
        if cfg.password is not None:
            return cfg.password.get_secret_value()
        if cfg.password_env is not None:
            value = os.environ.get(cfg.password_env)
            if not value:
                raise ImapAuthError(f"environment variable {cfg.password_env} is not set")
            return value
        assert cfg.password_file is not None
        try:
            return cfg.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ImapAuthError(f"cannot read password_file {cfg.password_file}: {exc}") from exc

    def _oauth2_token(self) -> str:
        oauth = self.cfg.oauth2
        assert oauth is not None
        if oauth.token_file is not None:
            try:
                token = oauth.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ImapAuthError(f"cannot read oauth2.token_file: {exc}") from exc
        else:
            command = oauth.token_command
            argv = shlex.split(command) if isinstance(command, str) else list(command or [])
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                      stdin=subprocess.DEVNULL, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ImapAuthError(f"oauth2.token_command failed: {exc}") from exc
            if proc.returncode != 0:
                raise ImapAuthError(f"oauth2.token_command exited {proc.returncode}: "
                                    f"{proc.stderr.strip()[:300]}")
            token = proc.stdout.strip()
        if not token:
            raise ImapAuthError("oauth2 token is empty")
        return token

    def disconnect(self, graceful: bool = True) -> None:
        """LOGOUT after a clean stop; after a failure just close (the peer may be gone)."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if graceful:
                client.logout()
            else:
                client.shutdown()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    # --- one pass ---------------------------------------------------------------------------

    def sync(self) -> int:
        """Take every new mail of the folder; returns how many were spooled."""
        assert self.client is not None
        cfg = self.cfg
        info = self.client.select_folder(cfg.folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = int(info.get(b"UIDNEXT", 0) or 0)
        state = self._load_state()
        if state.uidvalidity == uidvalidity and state.account == cfg.account:
            found = self.client.search(["UID", f"{state.last_uid + 1}:*", "NOT", "DELETED"])
            uids = sorted(u for u in found if u > state.last_uid)
            full = False
        else:
            if state.uidvalidity is not None:
                log.warning("%s: UIDVALIDITY is now %s (was %s for %s): synchronising again "
                            "from scratch; mail already ingested comes back as duplicate",
                            self.name, uidvalidity, state.uidvalidity, state.account)
            uids = sorted(self.client.search(self._full_sync_criteria(state)))
            full = True
        taken, complete = self._take_all(uidvalidity, uids, incremental=not full)
        if not complete:
            return taken  # stopped: the next start goes on from the server's flags and state
        changes: dict[str, Any] = {"last_success_at": utcnow()}
        if full:
            baseline = uidnext - 1 if uidnext else max(self.client.search(["ALL"]) or [0])
            changes.update(uidvalidity=uidvalidity, account=cfg.account,
                           last_uid=max([baseline, *uids]))
        self._save_state(**changes)
        return taken

    def _full_sync_criteria(self, state: FolderState) -> list[Any]:
        """What a first (or, after a UIDVALIDITY change, a new) synchronisation takes.

        The whole folder is the backlog, except in "seen" mode, where mail already read (by
        people, before ticketgate) is left alone.  After a UIDVALIDITY change in "seen" mode,
        mail delivered since the day before the last good pass is taken too, read or not, so
        that a mail a person opened in the gap is not lost; what was ingested before comes
        back as ``duplicate``.
        """
        if self.cfg.after != "seen":
            return ["NOT", "DELETED"]
        if state.uidvalidity is not None and state.last_success_at is not None:
            since = (state.last_success_at - dt.timedelta(days=1)).date()
            return ["OR", "UNSEEN", "SINCE", since, "NOT", "DELETED"]
        return ["UNSEEN", "NOT", "DELETED"]

    def _take_all(self, uidvalidity: int, uids: list[int], *, incremental: bool
                  ) -> tuple[int, bool]:
        """Take ``uids`` in batches; returns (spooled, complete) - not complete if stopped."""
        assert self.client is not None
        total, done, taken = len(uids), 0, 0
        if not total:
            return 0, True
        started = last_report = time.monotonic()
        reported = 0
        log.info("%s: %d message(s) to fetch", self.name, total)
        for start in range(0, total, SIZE_WINDOW):
            window = uids[start:start + SIZE_WINDOW]
            fetched = self.client.fetch(window, ["RFC822.SIZE"])
            sizes = {uid: int(data.get(b"RFC822.SIZE", 0)) for uid, data in fetched.items()}
            window = [uid for uid in window if uid in sizes]  # the rest vanished meanwhile
            oversized = [uid for uid in window if sizes[uid] > self.limit]
            wanted = [uid for uid in window if sizes[uid] <= self.limit]
            for uid in oversized:
                self._reject_oversized(uidvalidity, uid, sizes[uid])
            for batch in plan_batches(wanted, sizes, self.cfg.batch_size, self.cfg.batch_bytes):
                if self.stop.is_set():
                    return taken, False
                new = self._take_batch(uidvalidity, batch)
                taken += new
                done += len(batch)
                if incremental:
                    self._save_state(last_uid=batch[-1], add_ingested=new)
                else:
                    self._save_state(add_ingested=new)
                now = time.monotonic()
                if done - reported >= PROGRESS_EVERY or (now - last_report >= 5.0
                                                         and done < total):
                    rate = done / max(now - started, 1e-6)
                    log.info("%s: %d/%d fetched (%.0f msg/s)", self.name, done, total, rate)
                    reported, last_report = done, now
            done += len(oversized)
            if incremental and window:
                self._save_state(last_uid=window[-1])
        log.info("%s: %d message(s) spooled in %.1fs", self.name, taken,
                 time.monotonic() - started)
        return taken, True

    def _take_batch(self, uidvalidity: int, batch: list[int]) -> int:
        """Fetch, spool (one commit), enqueue, acknowledge: in this order, never another."""
        assert self.client is not None
        # INTERNALDATE: when the server took the mail in; the circuit breaker counts arrivals
        # by it, so a mailbox's old backlog is not mistaken for a storm.
        fetched = self.client.fetch(batch, ["BODY.PEEK[]", "INTERNALDATE"])
        items: list[tuple[bytes, str]] = []
        arrived: list[dt.datetime | None] = []
        got: list[int] = []
        for uid in batch:
            data = fetched.get(uid, {})
            raw = data.get(b"BODY[]")
            if raw is None:
                log.info("%s: UID %s vanished before it was fetched", self.name, uid)
                continue
            items.append((bytes(raw), self.source(uidvalidity, uid)))
            internal = data.get(b"INTERNALDATE")
            arrived.append(internal if isinstance(internal, dt.datetime) else None)
            got.append(uid)
        del fetched
        if not items:
            return 0
        spooled = self.ingestor.receive_batch(items, self.mailbox.id, DOOR, arrived=arrived)
        del items
        pending = [s.inbound_id for s in spooled if s.state == "received"]
        if pending:
            self.enqueue(pending)  # False (broker down) is fine: the sweep enqueues them later
        self.acknowledge(got)
        new = sum(1 for s in spooled if s.new)
        again = len(spooled) - new
        if again:
            log.info("%s: %d message(s) were already spooled by an earlier run; not again",
                     self.name, again)
        return new

    def _reject_oversized(self, uidvalidity: int, uid: int, size: int) -> None:
        """Record it ``rejected`` from a few header fields; never download it, never delete it."""
        assert self.client is not None
        head = b""
        fetched = self.client.fetch([uid], [HEAD_ITEM]).get(uid, {})
        for key, value in fetched.items():
            if isinstance(key, bytes) and key.startswith(b"BODY[") and isinstance(value, bytes):
                head = value
        reason = (f"too large: {size} bytes (IMAP RFC822.SIZE), the limit is {self.limit}; "
                  "not downloaded")
        info = self.ingestor.record_rejected(self.mailbox.id, DOOR,
                                             self.source(uidvalidity, uid), reason,
                                             head=head, size=size)
        target = self.cfg.oversized_move_to
        log.warning("%s: UID %s %s; recorded as inbound %s and %s", self.name, uid, reason,
                    info.InboundId, f"moved to {target!r}" if target else "left on the server")
        if target:
            self._move([uid], target)

    # --- acknowledging on the server --------------------------------------------------------

    def acknowledge(self, uids: list[int]) -> None:
        """Only after the mails are spooled: \\Seen, MOVE or delete, per ``after``."""
        if not uids:
            return
        assert self.client is not None
        if self.cfg.after == "seen":
            self.client.add_flags(uid_set(uids), [SEEN], silent=True)
        elif self.cfg.move_to:
            self._move(uids, self.cfg.move_to)
        else:
            self.client.add_flags(uid_set(uids), [DELETED], silent=True)
            self._expunge(uids)

    def _move(self, uids: list[int], target: str) -> None:
        assert self.client is not None
        if self.client.has_capability("MOVE"):
            self.client.move(uid_set(uids), target)
            return
        self.client.copy(uid_set(uids), target)
        self.client.add_flags(uid_set(uids), [DELETED], silent=True)
        self._expunge(uids)

    def _expunge(self, uids: list[int]) -> None:
        assert self.client is not None
        if self.client.has_capability("UIDPLUS"):
            self.client.uid_expunge(uid_set(uids))  # only ours, not others' \Deleted mail
        else:
            self.client.expunge()

    # --- waiting for news -------------------------------------------------------------------

    def idle(self) -> None:
        """IDLE until the server reports new mail, ``idle_renew`` passes, or stop is set.

        If the connection breaks meanwhile this raises, and :meth:`run` drops the connection.
        """
        assert self.client is not None
        client = self.client
        client.idle()
        started = time.monotonic()
        silent_wakeups = 0
        while not self.stop.is_set():
            tick = time.monotonic()
            responses = client.idle_check(timeout=self.idle_tick)
            if any(_is_bye(r) for r in responses):
                raise ConnectionLost(f"server closed the connection: {responses}")
            if any(_is_news(r) for r in responses):
                break
            # imapclient returns [] both on timeout and at EOF; an early empty return is EOF.
            if not responses and time.monotonic() - tick < self.idle_tick / 2:
                silent_wakeups += 1
                if silent_wakeups >= 3:
                    raise ConnectionLost("connection closed while idling")
            else:
                silent_wakeups = 0
            if time.monotonic() - started >= self.idle_renew:
                break
        client.idle_done()

    # --- state in the database --------------------------------------------------------------

    def source(self, uidvalidity: int, uid: int) -> str:
        """RFC 5092 IMAP URL of one message: what ``InboundMail.source`` records."""
        cfg = self.cfg
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        return (f"imap://{quote(cfg.user, safe='')}@{host}:{cfg.port}/"
                f"{quote(cfg.folder, safe='/')};UIDVALIDITY={uidvalidity}/;UID={uid}")

    def _load_state(self) -> FolderState:
        with self.ingestor.session() as session:
            row = self._state_row(session)
            if row is None:
                return FolderState(None, 0, self.cfg.account)
            return FolderState(row.uidvalidity, int(row.last_uid or 0), row.account,
                               row.last_success_at)

    def _state_row(self, session: Any) -> ImapFolderState | None:
        return session.scalar(select(ImapFolderState).where(
            ImapFolderState.mailbox_id == self.mailbox.id,
            ImapFolderState.folder == self.cfg.folder))

    def _save_state(self, add_ingested: int = 0, **changes: Any) -> None:
        for attempt in range(2):
            with self.ingestor.session() as session:
                row = self._state_row(session)
                if row is None:
                    row = ImapFolderState(mailbox_id=self.mailbox.id, folder=self.cfg.folder,
                                          account=self.cfg.account, last_uid=0, ingested=0)
                    session.add(row)
                for key, value in changes.items():
                    setattr(row, key, value)
                row.ingested = (row.ingested or 0) + add_ingested
                row.updated_at = utcnow()
                try:
                    session.commit()
                    return
                except IntegrityError:  # another process created the row first
                    session.rollback()
                    if attempt:
                        raise


def _is_news(response: Any) -> bool:
    return (isinstance(response, tuple) and len(response) >= 2
            and response[1] in (b"EXISTS", b"RECENT"))


def _is_bye(response: Any) -> bool:
    return isinstance(response, tuple) and bool(response) and response[0] == b"BYE"


def serve_imap(ingestor: Ingestor, enqueue: Enqueue, *, mailbox_ids: Sequence[int] = (),
               stop: threading.Event | None = None, **poller_options: Any) -> int:
    """Run one poller thread per IMAP mailbox until ``stop`` is set (or SIGTERM/SIGINT).

    Returns 0 after a clean stop, 2 when no mailbox (of ``mailbox_ids``) has IMAP settings.
    """
    boxes = [box for box in ingestor.settings.imap_mailboxes
             if not mailbox_ids or box.id in mailbox_ids]
    if not boxes:
        log.error("no mailbox has imap settings%s", f" among {list(mailbox_ids)}"
                  if mailbox_ids else "")
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: stop.set())
    lock = threading.Lock()

    def enqueue_serialised(ids: list[int]) -> object:
        with lock:  # one broker producer, many poller threads
            return enqueue(ids)

    pollers = [ImapPoller(ingestor, box, enqueue_serialised, stop, **poller_options)
               for box in boxes]
    for poller in pollers:
        poller.start()
    names = ", ".join(p.name for p in pollers)
    log.info("IMAP polling %s", names)
    print(f"ticketgate imap polling {len(pollers)} mailbox(es): {names}", flush=True)
    while not stop.wait(1.0):
        for poller in pollers:  # run() never returns before stop; a dead thread is a bug
            if poller.thread is not None and not poller.thread.is_alive():
                log.error("%s: poller thread died; starting it again", poller.name)
                poller.start()
    for poller in pollers:
        if poller.thread is not None:
            poller.thread.join(timeout=30)
    log.info("IMAP stopped")
    return 0


def status_lines(ingestor: Ingestor) -> list[str]:
    """One line per configured IMAP folder: position, counts, last success, last error."""
    with ingestor.session() as session:
        rows = {(r.mailbox_id, r.folder): r for r in session.scalars(select(ImapFolderState))}
    lines = []
    for box in ingestor.settings.imap_mailboxes:
        assert box.imap is not None
        row = rows.get((box.id, box.imap.folder))
        where = f"mailbox {box.id} ({box.name}) {box.imap.account}/{box.imap.folder}"
        if row is None:
            lines.append(f"{where}: never polled")
            continue
        ok = row.last_success_at.isoformat(timespec="seconds") if row.last_success_at else "never"
        line = (f"{where}: uidvalidity {row.uidvalidity} last_uid {row.last_uid} "
                f"ingested {row.ingested} last_success {ok}")
        if row.last_error_at and (not row.last_success_at
                                  or row.last_error_at > row.last_success_at):
            line += f" FAILING since {row.last_error_at.isoformat(timespec='seconds')}: " \
                    f"{row.last_error}"
        lines.append(line)
    return lines

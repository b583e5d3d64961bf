"""What a mail's processing works out before its transaction, and replay's helper processes.

Everything that needs no database (the parse, the visible reply, the classification, and the
sender evidence with its DNS lookups) is worked out before a mail's transaction opens
(:func:`prepare_delivery`), so the transaction holds its locks only for the database's work.

Replay goes further and parses in helper processes while the main process writes the tickets.
Parsing and visible-reply extraction need nothing but the bytes, and they were about 40% of a
replayed mail's time.  The steps that read and write the database must run one mail after the
other in one process (a reply needs its parent's ticket), so a replay used one core of several.
Here helper processes parse ahead of the main process, in input order, and the main process
takes each :class:`~ingest.parse.ParsedMail` from them instead of parsing it again (and the
spool's digest of the bytes, the SHA-256 and the header Message-ID).

Two rules keep this invisible to the result:

* a helper only ever hands over a parsed mail or nothing; whatever goes wrong there (a hostile
  mail over a parser limit, a crash, a result that does not pickle) is left to the main process,
  which parses the mail itself and meets the error on the ordinary path (rejected, quarantined,
  recorded), exactly as without helpers;
* the main process never idles on a helper: a chunk no helper has started yet is taken back and
  parsed in the main process.  So a one-file replay does not wait for helpers to start, and when
  the helpers fall behind (big mails, slow parsing) the main process parses too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ingest import spool
from ingest.authentication import SenderAuthentication, lookup_for, organizational_domain
from ingest.config import Settings
from ingest.models import InboundMail
from ingest.parse import ParsedMail, parse_mail
from ingest.reply import visible_reply
from ingest.steps.authenticate import checked_here, sender_evidence
from ingest.steps.classify import classify_mail

log = logging.getLogger("ticketgate.prepare")

CHUNK_MAILS = 16  # mails per hand-off to a helper, which has a fixed cost
CHUNK_BYTES = 4 * 1024 * 1024  # ... or fewer when they are large
CHUNKS_PER_HELPER = 4  # chunks in flight per helper: bounds the memory held ahead
MAX_HELPERS = 4  # past this the main process's database work is the limit anyway
HELPER_NICENESS = 10
START_AFTER = 32  # mails a replay runs before helpers are started

Item = tuple[bytes, str]


def default_helpers() -> int:
    """One helper per core (at most :data:`MAX_HELPERS`), none on a single core.

    Not one fewer than the cores: the writing process waits on the database for part of each
    batch (fsync, round trips), and a chunk no helper has begun is parsed by the writer anyway,
    so a helper too many costs little.  On two cores, two helpers replayed faster than one
    (bench/README.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return 0 if cores < 2 else min(MAX_HELPERS, cores)


def _start_method() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux: the helper starts in milliseconds with the parser already imported,
    and it never re-runs the caller's ``__main__`` (``spawn`` does, in a script without a main
    guard).  A helper only parses and leaves with ``os._exit``: the database connections it
    inherits are never touched.  Elsewhere ``spawn``."""
    method = "fork" if sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method)


def _lower_priority() -> None:
    """Helpers yield the CPU to the writing process and the database server: those two are
    the critical path (each mail's steps wait on a round trip), the helpers only work ahead."""
    with contextlib.suppress(OSError):
        os.nice(HELPER_NICENESS)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a helper computed for one mail: the spool's digest of the bytes (SHA-256 and the
    header Message-ID, see :func:`ingest.spool.new_inbound`) and the parsed mail with its
    visible reply, or None where the pipeline must parse."""

    sha256: str
    message_id: str | None
    mail: ParsedMail | None


def prepare(raw: bytes, max_bytes: int) -> Prepared:
    """The spool digest, the parse step's work and the visible reply of one mail."""
    return Prepared(*spool.raw_digest(raw), prepare_mail(raw, max_bytes))


def prepare_delivery(inbound: InboundMail, raw: bytes, settings: Settings,
                     evidence: SenderAuthentication | None = None) -> ParsedMail | None:
    """:func:`prepare_mail` and the sender evidence for this delivery: everything the steps
    need that takes no database, worked out before the mail's transaction opens.

    A transaction open during a parse or during SPF, DKIM and DMARC lookups (seconds, when a
    name server is slow) holds SQLite's one write lock, so the listener's spool writes and
    every other worker wait; on PostgreSQL it holds rows, claim locks and a pooled connection.
    None where the pipeline must parse; the evidence is left to the step where it could not be
    worked out here (the step then meets the error on the ordinary path).  ``evidence`` from an
    earlier run of the same delivery (a retry after a lost race) is taken as it is: no step
    changes it, and its lookups need not be made twice."""
    mail = prepare_mail(raw, settings.service.max_message_bytes)
    if mail is not None:
        if evidence is not None:
            mail.authentication = evidence
        else:
            add_evidence(mail, inbound, raw, settings)
    return mail


def add_evidence(mail: ParsedMail, inbound: InboundMail, raw: bytes, settings: Settings
                 ) -> SenderAuthentication | None:
    """Work out ``mail.authentication`` for this delivery ahead of its transaction; it is also
    returned (None where it could not be worked out)."""
    try:
        mail.authentication = sender_evidence(settings, settings.mailbox_for(inbound.mailbox_id),
                                              inbound, raw, mail.message)
    except Exception as exc:  # the step works it out again and records what it meets
        log.warning("inbound %s: sender evidence failed ahead of the transaction: %s: %s",
                    inbound.id or f"sha256:{inbound.sha256}", type(exc).__name__, exc,
                    exc_info=True)
    return mail.authentication


# A batch's own SPF, DKIM and DMARC checks at once: they wait on name servers, not on the CPU,
# so sixteen new senders' look-ups take about as long as one sender's.  As many threads as a
# worker task carries mails: a mail queued behind slow senders would count as slow itself.
EVIDENCE_THREADS = 16
# How long a worker batch waits for its senders' look-ups.  Answers come in milliseconds, and
# a long SPF include chain, uncached, in a second or two; a sender whose name server is slower
# than this goes on after the batch, alone, instead of holding up the batch's other mails for
# up to the resolver's timeouts (about a minute with the defaults).
BATCH_EVIDENCE_WAIT_SECONDS = 3.0

PendingEvidence = Future[SenderAuthentication | None]  # look-ups still running


def add_evidence_many(deliveries: Sequence[tuple[ParsedMail, InboundMail, bytes]],
                      settings: Settings, wait: float | None = None
                      ) -> dict[int, PendingEvidence]:
    """:func:`add_evidence` for a batch's mails.  Those ticketgate checks itself (SMTP from
    outside ``trusted_relays``: SPF, DKIM and DMARC, each a few DNS round trips, seconds when a
    name server is slow) run side by side in threads; the rest (an upstream server's
    Authentication-Results, mostly answered from the resolver's cache) one after the other.

    With ``wait``, returns after at most that many seconds of look-ups: the deliveries whose
    look-ups still run then, by inbound id, each with the future of its evidence.  Their
    ``mail.authentication`` must not be read: the look-up sets it later.  Such a look-up runs
    on after the caller has gone on, and a process that exits meanwhile waits for it (at most
    the resolver's timeouts); a prefork worker's pool process exits without waiting."""
    own = [d for d in deliveries if checked_here(settings.authentication, d[1])]
    for mail, inbound, raw in deliveries:
        if len(own) < 2 or not checked_here(settings.authentication, inbound):
            add_evidence(mail, inbound, raw, settings)
    if len(own) < 2:
        return {}
    # Built once before the threads (each cache would otherwise be built by several of them).
    lookup_for(settings.authentication)
    organizational_domain("example.com")
    pool = ThreadPoolExecutor(min(EVIDENCE_THREADS, len(own)), thread_name_prefix="evidence")
    running: dict[PendingEvidence, InboundMail] = {}
    for delivery in own:
        try:
            running[pool.submit(add_evidence, *delivery, settings)] = delivery[1]
        except RuntimeError as exc:  # no thread could be started (a process limit)
            log.warning("sender evidence side by side failed (%s); one after the other", exc)
            # The refused work may be queued already: cancelled, or waited for if a thread took
            # it, so that no mail is checked by a thread and here at once.
            pool.shutdown(wait=True, cancel_futures=True)
            for mail, inbound, raw in own:
                if mail.authentication is None:
                    add_evidence(mail, inbound, raw, settings)
            return {}
    _done, late = wait_for_futures(running, timeout=wait)
    pool.shutdown(wait=False)  # late look-ups go on; their futures get the evidence
    return {running[future].id: future for future in late}


def prepare_mail(raw: bytes, max_bytes: int) -> ParsedMail | None:
    """What the pipeline can work out from the bytes alone, ahead of its steps: the parsed mail
    with its visible reply and classification.  None where the pipeline must parse itself: a
    mail it rejects before parsing, or one whose parse fails (the step meets the error and
    records it)."""
    if len(raw) > max_bytes:
        return None
    try:
        mail = parse_mail(raw)
        mail.visible_text = visible_reply(mail.text)
        mail.classification = classify_mail(mail)
    except Exception:
        return None
    return mail


# A small mail with the parts that make first use slow: a multipart/alternative with HTML
# (the sanitizer, the HTML-to-text converter) and a quoted reply under an attribution line (the
# quote-header patterns, compiled on first use).
_WARM_UP_MAIL = (
    b"From: Warm Up <warm-up@example.invalid>\r\n"
    b"To: support@example.invalid\r\n"
    b"Subject: Re: warm-up\r\n"
    b"Message-ID: <warm-up@example.invalid>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=\"warm-up\"\r\n\r\n"
    b"--warm-up\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Thanks, that helped.\r\n\r\nOn Mon, 2 Mar 2026 at 10:00, Support <support@example.invalid>"
    b" wrote:\r\n> Please restart the printer.\r\n\r\n"
    b"--warm-up\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><p>Thanks, that <b>helped</b>.</p><blockquote>Please restart the printer."
    b"</blockquote></body></html>\r\n--warm-up--\r\n"
)


def warm_up() -> None:
    """Prepare one small mail, so that what the first real mail would pay once (patterns
    compiled on first use, the parser's and sanitizer's first calls) is paid before any mail
    waits on it.  A Celery worker runs this before it forks its pool, and the pool's processes
    inherit the result: cold, each process's first task took 0.3 s instead of 0.06 s."""
    prepare_mail(_WARM_UP_MAIL, len(_WARM_UP_MAIL))


def _prepare_chunk(raws: list[bytes], max_bytes: int) -> list[bytes | None]:
    """Run in a helper: each result pickled on its own, so one bad mail spoils no other."""
    results: list[bytes | None] = []
    for raw in raws:
        prepared = prepare(raw, max_bytes)
        if prepared.mail is not None:
            prepared.mail.by_helper = True
        try:
            results.append(pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # e.g. recursion on a pathological MIME tree: the digest at least
            results.append(pickle.dumps(Prepared(prepared.sha256, prepared.message_id, None)))
    return results


def _unpickle(blob: bytes | None) -> Prepared | None:
    if blob is None:
        return None
    try:
        prepared = pickle.loads(blob)
    except Exception:  # the main process does it all itself
        return None
    return prepared if isinstance(prepared, Prepared) else None


class Preparer:
    """A pool of helper processes that parse a stream of mails ahead of the caller.

    The helpers start only once the stream has yielded ``start_after`` mails: for a replay of a
    few files they would cost more than they save.  Until the first helper result is in, the
    caller parses for itself.
    """

    def __init__(self, helpers: int, max_bytes: int, start_after: int | None = None) -> None:
        self.helpers = helpers
        self.max_bytes = max_bytes
        self.start_after = START_AFTER if start_after is None else start_after
        self._pool: ProcessPoolExecutor | None = None
        self._warm = False  # a helper has returned a result: waiting on one is worth it
        self.prepared = 0  # mails a helper parsed
        self.in_process = 0  # mails left to the caller (helpers not started, busy or failed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            log.info("parse helpers: %d mails parsed ahead, %d in-process",
                     self.prepared, self.in_process)

    def __enter__(self) -> Preparer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def stream(self, items: Iterable[Item]) -> Iterator[tuple[bytes, str, Prepared | None]]:
        """Yield ``(raw, source, Prepared or None)`` in input order; None: do it all yourself."""
        mails = iter(items)
        if self.helpers <= 0:
            yield from self._unprepared(mails)
            return
        for seen, (raw, source) in enumerate(mails, start=1):
            self.in_process += 1
            yield raw, source, None
            if seen >= self.start_after:
                break
        else:
            return  # the whole stream was short
        try:
            self._pool = ProcessPoolExecutor(self.helpers, mp_context=_start_method(),
                                             initializer=_lower_priority)
        except (OSError, ValueError) as exc:
            log.warning("parse helpers unavailable, parsing in-process: %s", exc)
            yield from self._unprepared(mails)
            return
        window: deque[tuple[list[Item], Future[list[bytes | None]]]] = deque()
        chunks = _chunks(mails)
        for chunk in chunks:
            try:
                future = self._pool.submit(_prepare_chunk, [raw for raw, _ in chunk],
                                           self.max_bytes)
            except (BrokenProcessPool, RuntimeError) as exc:
                log.warning("parse helpers gone, parsing in-process: %s", exc)
                while window:
                    yield from self._take(*window.popleft())
                yield from self._unprepared(iter(chunk))
                yield from self._unprepared(mail for rest in chunks for mail in rest)
                return
            window.append((chunk, future))
            if len(window) >= self.helpers * CHUNKS_PER_HELPER:
                yield from self._take(*window.popleft())
        while window:
            yield from self._take(*window.popleft())

    def _unprepared(self, mails: Iterator[Item]) -> Iterator[tuple[bytes, str, None]]:
        for raw, source in mails:
            self.in_process += 1
            yield raw, source, None

    def _take(self, chunk: list[Item], future: Future[list[bytes | None]]
              ) -> Iterator[tuple[bytes, str, Prepared | None]]:
        # Helpers still starting, or this chunk not begun: the caller parses it rather than
        # wait (a chunk already started then finishes unused).
        if not future.done() and (future.cancel() or not self._warm):
            yield from self._unprepared(iter(chunk))
            return
        try:
            blobs = future.result()
        except (CancelledError, Exception) as exc:  # a helper died, say
            log.warning("a parse helper failed, parsing %d mails in-process: %s", len(chunk), exc)
            yield from self._unprepared(iter(chunk))
            return
        self._warm = True
        self.prepared += len(chunk)
        for (raw, source), blob in zip(chunk, blobs, strict=True):
            yield raw, source, _unpickle(blob)


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    size = 0
    for raw, source in items:
        chunk.append((raw, source))
        size += len(raw)
        if len(chunk) >= CHUNK_MAILS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk

"""The flow of one mail, top to bottom.  Read this file first.

    spool record ──> dedupe ─> limits ─> parse ─> classify ─> authenticate ─> thread ─> automail
                                                                                              │
          ┌── sender <─ route <─ circuit breaker <────────────────────────────────────────────┘
          │
          └─> store (one transaction) ─> inbound record's final state ─> TicketInfo

What needs no database (the parse, the sender evidence with its DNS lookups) is worked out
before a mail's transaction opens (:func:`~ingest.prepare.prepare_delivery`); the steps take it
from there.  Each step takes the :class:`~ingest.context.MailContext`, adds to it, and returns
``None`` to go on or an :class:`~ingest.context.Outcome` to end processing with a reason.
Whatever happens, the inbound record ends in exactly one final state, in the same transaction as
the ticket rows: ``created``, ``appended``, ``duplicate``, ``ignored``, ``rejected``, or
``quarantined``: when a step raises (with the error), or when a policy holds the mail (DMARC,
circuit breaker: with the reason); either is replayable with ``ticketgate quarantine replay``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ingest import spool
from ingest.authentication import SenderAuthentication
from ingest.config import Settings
from ingest.context import BatchState, Claim, MailContext, Outcome, Trace
from ingest.errors import AttemptsExhausted, InboundNotFound, ParentPending, TransientError
from ingest.models import FINAL_STATES, InboundMail, utcnow
from ingest.parse import ParsedMail
from ingest.prepare import (
    BATCH_EVIDENCE_WAIT_SECONDS,
    PendingEvidence,
    add_evidence_many,
    prepare_delivery,
    prepare_mail,
)
from ingest.reply import visible_reply
from ingest.steps.authenticate import authenticate
from ingest.steps.automail import stop_unreferenced_automatic_mail
from ingest.steps.circuit_breaker import circuit_breaker, read_window
from ingest.steps.classify import classify
from ingest.steps.dedupe import drop_duplicate, lock_claims, read_claims
from ingest.steps.limits import enforce_size
from ingest.steps.parsing import parse
from ingest.steps.routing import route
from ingest.steps.sender import identify_sender, read_persons
from ingest.steps.store import (
    number_tickets,
    store_ticket,
    write_messages,
    write_ticket_counts,
)
from ingest.steps.threading import (
    find_ticket,
    read_message_tickets,
    read_spooled_parents,
    read_tickets,
    referenced_ids,
)
from ingest.ticketinfo import TicketInfo, ticket_info

if TYPE_CHECKING:
    from ingest.service import Ingestor

log = logging.getLogger("ticketgate.pipeline")

Step = Callable[[MailContext], Outcome | None]

STEPS: tuple[Step, ...] = (
    drop_duplicate,  # a second delivery returns the first result
    enforce_size,  # oversized mail is rejected before it is parsed
    parse,  # mail-parser; charsets, HTML, TNEF
    classify,  # loops end here; auto-replies, bounces, bulk are labelled
    authenticate,  # SPF, DKIM, DMARC: quarantine per DMARC policy; unverified senders flagged
    find_ticket,  # In-Reply-To, References, signed Message-IDs, trusted subject tags
    stop_unreferenced_automatic_mail,  # labelled mail never opens a ticket
    circuit_breaker,  # per ticket / sender / sender+subject rate in a window: storms held
    route,  # mailbox defaults and [[rule]]s, for new tickets; may ignore or reject
    identify_sender,  # person, company, Cc; unknown senders per policy (after rules, so an
    #                   ignored or rejected mail leaves no person behind)
)
MAX_KEY_RACES = 3
# SQLSTATEs of a transaction PostgreSQL aborted to break a lock cycle with another one
# (deadlock detected, serialization failure): neither the database nor the mail is at fault.
_LOCK_RACE_STATES = frozenset({"40P01", "40001"})


def _lost_lock_race(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _LOCK_RACE_STATES

# The record comes back with its counted start: its bytes and envelope are what the mail's
# processing works out ahead of its transaction (ingest.prepare.prepare_delivery).
_COUNT_ATTEMPT = (
    update(InboundMail)
    .where(InboundMail.id == bindparam("inbound"), InboundMail.state.not_in(FINAL_STATES))
    .values(attempts=func.coalesce(InboundMail.attempts, 0) + 1)
    .returning(*InboundMail.__table__.columns)
)
_EXISTS = select(InboundMail.id).where(InboundMail.id == bindparam("inbound"))
# Locked in the transaction without the bytes, which the start read already.
_WITHOUT_RAW = [column for column in InboundMail.__table__.columns if column.key != "raw"]
_LOCK_RECORD = (
    select(*InboundMail.__table__.columns)
    .where(InboundMail.id == bindparam("inbound")).with_for_update()
)
_LOCK_RECORD_WITHOUT_RAW = (
    select(*_WITHOUT_RAW).where(InboundMail.id == bindparam("inbound")).with_for_update()
)
_FINAL_STATE = (
    update(InboundMail)
    .where(InboundMail.id == bindparam("inbound"))
    .values({column: bindparam(column) for column in (
        "duplicate_of_id", "dedupe_claim", "state", "reason", "error", "ticket_id",
        "ticket_message_id", "trace", "result", "processed_at", "attempts")})
)


def run_steps(ctx: MailContext, ingestor: Ingestor) -> Outcome:
    for step in STEPS:
        outcome = step(ctx)
        if outcome is not None:
            return outcome
    if ctx.mail.visible_text is None:  # a replay helper may have done it already
        ctx.mail.visible_text = visible_reply(ctx.mail.text)
    return store_ticket(ctx, ingestor.reference)


def record_outcome(ctx: MailContext, outcome: Outcome, ingestor: Ingestor) -> TicketInfo:
    """Write the final state onto the inbound record and build the TicketInfo.

    One Core ``UPDATE`` (the ORM's change tracking cost more than the statement); the record
    object gets the same values as committed state, so it reads as stored.  A second record
    claiming the same idempotency key fails here with IntegrityError (the unique claim).
    """
    inbound = ctx.inbound
    settings = ingestor.settings
    final: dict[str, Any] = {"duplicate_of_id": None, "dedupe_claim": None}
    if outcome.action == "duplicate":
        first = dict(outcome.result or {})
        first.pop("Action", None)
        first.pop("Reason", None)
        first.pop("InboundId", None)
        info = TicketInfo(**first, Action="duplicate", Reason=outcome.reason, InboundId=inbound.id)
        final["duplicate_of_id"] = outcome.duplicate_of
    else:
        info = ticket_info(
            action=outcome.action,
            reason=outcome.reason,
            message_id=ctx.parsed.message_id if ctx.parsed else inbound.header_message_id,
            inbound_id=inbound.id,
            ticket=outcome.ticket,
            ref=ingestor.reference,
            base_url=settings.service.base_url,
            tag_template=settings.service.subject_tag,
            threaded_by=ctx.threaded_by if outcome.action == "appended" else None,
        )
        final["dedupe_claim"] = spool.dedupe_claim(inbound.mailbox_id, inbound.idempotency_key)
    if info.MessageId is None:
        info.MessageId = inbound.header_message_id
    final.update(
        state=outcome.action,
        reason=outcome.reason,
        error=None,
        ticket_id=info.TicketId or None,
        ticket_message_id=ctx.message_row_id,
        trace=ctx.trace.lines,
        result=info.model_dump(),
        processed_at=utcnow(),
        attempts=max(inbound.attempts or 0, 1),
    )
    if ctx.batch is None:
        ctx.session.connection().execute(_FINAL_STATE, {"inbound": inbound.id, **final})
    else:  # written with the batch's others (process_new_batch); its claim counts from now on
        ctx.batch.final_states.append({"inbound": inbound.id, **final})
        if final["dedupe_claim"] is not None:
            ctx.batch.claims[final["dedupe_claim"]] = Claim(inbound.id, outcome.action,
                                                            final["result"])
    for key, value in final.items():
        set_committed_value(inbound, key, value)
    return info


def _process_in(session: Session, inbound: InboundMail, raw: bytes, ingestor: Ingestor,
                can_defer: bool = False, prepared: ParsedMail | None = None,
                batch: BatchState | None = None) -> tuple[TicketInfo, MailContext]:
    ctx = MailContext(
        session=session,
        settings=ingestor.settings,
        mailbox=ingestor.settings.mailbox_for(inbound.mailbox_id),
        inbound=inbound,
        raw=raw,
        can_defer=can_defer,
        reference=ingestor.reference,
        prepared=prepared,
        batch=batch,
    )
    try:
        outcome = run_steps(ctx, ingestor)
    except Exception as exc:
        exc.trace = ctx.trace  # type: ignore[attr-defined]  # kept for the quarantine record
        raise
    info = record_outcome(ctx, outcome, ingestor)
    session.flush()  # an appended-to ticket's changes, Cc persons
    return info, ctx


def _start_attempt(ingestor: Ingestor, inbound_id: int) -> InboundMail | None:
    """Count this processing start in its own commit, so a mail that kills or hangs its worker
    is recognised on the next delivery.  Returns the record as counted, its bytes and envelope
    included, which the mail's processing works out from before its transaction opens (see
    :func:`~ingest.prepare.prepare_delivery`); None when the record is already final."""
    with ingestor.sessions() as session:
        try:
            row = session.connection().execute(_COUNT_ATTEMPT, {"inbound": inbound_id}).first()
            if row is not None:
                session.commit()
            else:
                exists = session.connection().execute(_EXISTS, {"inbound": inbound_id}).first()
        except OperationalError as exc:  # retried with backoff, as the batch's start is
            raise TransientError(f"database unavailable: {exc.orig}") from exc
    if row is None:
        if exists is None:
            raise InboundNotFound(f"no inbound mail {inbound_id}")
        return None  # final already
    return InboundMail(**row._mapping)


def _locked_record(session: Session, inbound_id: int, raw: bytes | None) -> InboundMail | None:
    """The record locked for this transaction: one Core SELECT ... FOR UPDATE, which reads the
    bytes only when ``raw`` (read at the start) is None.  The object stays outside the session;
    its final state is one UPDATE (:func:`record_outcome`)."""
    if raw is None:
        row = session.connection().execute(_LOCK_RECORD, {"inbound": inbound_id}).first()
        return InboundMail(**row._mapping) if row is not None else None
    row = session.connection().execute(_LOCK_RECORD_WITHOUT_RAW, {"inbound": inbound_id}).first()
    return InboundMail(**row._mapping, raw=raw) if row is not None else None


def process_inbound(ingestor: Ingestor, inbound_id: int,
                    evidence: SenderAuthentication | None = None) -> TicketInfo:
    """Process a spooled record (SMTP, IMAP, worker and sweep path).  Idempotent.
    ``evidence``: its sender evidence, when a batch that failed worked it out already."""
    started = _start_attempt(ingestor, inbound_id)
    max_attempts = ingestor.settings.worker.max_attempts
    if started is not None and started.attempts > max_attempts:
        return quarantine(ingestor, inbound_id, AttemptsExhausted(
            f"processing started {started.attempts - 1} times without finishing "
            "(worker died or hung)"))
    # Prepared after the check above: a mail whose parse or DKIM check kills its worker is
    # quarantined on its next start, not parsed again.
    raw = started.raw if started is not None else None
    prepared: ParsedMail | None = None
    for _race in range(MAX_KEY_RACES):
        if started is not None:  # afresh on a retry: the last run's steps may have changed it
            prepared = prepare_delivery(started, started.raw, ingestor.settings,
                                        prepared.authentication if prepared else evidence)
        with ingestor.sessions() as session:
            try:
                inbound = _locked_record(session, inbound_id, raw)
                if inbound is None:
                    raise InboundNotFound(f"no inbound mail {inbound_id}")
                if inbound.state in FINAL_STATES:
                    return TicketInfo(**inbound.result) if inbound.result else _stateless(inbound)
                lock_claims(session, [spool.dedupe_claim(inbound.mailbox_id,
                                                         inbound.idempotency_key)])
                info, _ctx = _process_in(session, inbound, inbound.raw, ingestor,
                                         can_defer=True, prepared=prepared)
                session.commit()
                _log(info)
                return info
            except IntegrityError:
                session.rollback()  # another worker took the same key or person; look again
                continue
            except ParentPending:
                session.rollback()
                _forget_attempts(ingestor, [inbound_id])  # a deferral is no failed attempt
                raise
            except OperationalError as exc:
                session.rollback()
                if _lost_lock_race(exc):
                    continue  # another worker's transaction was in the way: again, now
                raise TransientError(f"database unavailable: {exc.orig}") from exc
            except (InboundNotFound, TransientError):
                raise
            except Exception as exc:
                session.rollback()
                return quarantine(ingestor, inbound_id, exc)
    raise TransientError(f"inbound mail {inbound_id}: lost {MAX_KEY_RACES} races, retry later")


@dataclass(slots=True)
class SpooledResults:
    """What :func:`process_inbound_many` did with each id it was given."""

    infos: dict[int, TicketInfo] = field(default_factory=dict)
    deferred: list[int] = field(default_factory=list)  # replies waiting for their parent
    parents: dict[int, int] = field(default_factory=dict)  # deferred id -> the parent's id
    missing: list[int] = field(default_factory=list)  # no such record
    # not done when the deadline passed: not begun and uncounted, or still counted while the
    # sender's look-ups ran on
    left: list[int] = field(default_factory=list)

    def defer(self, inbound_id: int, pending: ParentPending) -> None:
        self.deferred.append(inbound_id)
        if pending.parent_id is not None:
            self.parents[inbound_id] = pending.parent_id


# How often a task waiting for the parents of its deferred replies looks at their state.
PARENT_POLL_SECONDS = 0.02


def process_inbound_many(ingestor: Ingestor, inbound_ids: Sequence[int],
                         deadline: float | None = None, parent_wait: float = 0.0
                         ) -> SpooledResults:
    """:func:`process_inbound` for several spooled records (one worker task), with one
    transaction and one commit for those never started before (see :func:`_batches`).

    Poison mail stays isolated: a record whose processing was started before (a worker died
    on it or on its task) goes the one-by-one path, as does a mail over
    :data:`BATCH_MAX_MAIL_BYTES`.  The fresh ones have their start counted
    together, in one commit, then run as a batch like a replay's; if anything in the batch
    fails, it is rolled back, the starts are taken back, and every record goes the one-by-one
    path, which quarantines the mail at fault.  A worker that dies in the batch leaves every
    record of it started once, so the redelivered task takes them one by one.  A parent
    earlier in the same batch counts as processed.  No record is begun after ``deadline``
    (``time.monotonic()``), neither its preparation in the batch nor its processing one by
    one: those are returned in ``left``, their starts not counted (a mail whose sender's
    look-ups outlasted the batch's wait and then the deadline goes back counted).

    A reply whose parent is spooled but unprocessed is deferred (not counted as an attempt)
    while the others go on.  Its parent is nearly always in another worker's batch, committed
    a few tens of milliseconds later, so the task waits up to ``parent_wait`` seconds for the
    parents it names and runs those replies again; only what is still deferred then is left
    to the caller's retry.  (A broker retry queues behind the whole backlog: under load it
    added seconds to about one mail in a hundred.)
    """
    results = _process_spooled(ingestor, inbound_ids, deadline)
    give_up = time.monotonic() + parent_wait
    if deadline is not None:
        give_up = min(give_up, deadline)
    while results.deferred and time.monotonic() < give_up:
        # Only parents outside the task: one deferred here is run again first, in order.
        outside = set(results.parents.values()) - set(results.deferred)
        if not outside or not _wait_for_parents(ingestor, outside, give_up):
            break
        again = _process_spooled(ingestor, results.deferred, deadline)
        results.infos.update(again.infos)
        results.deferred, results.parents = again.deferred, again.parents
        results.missing.extend(again.missing)
        results.left.extend(again.left)
    return results


_PARENTS_WAITING = (
    select(func.count()).select_from(InboundMail)
    .where(InboundMail.id.in_(bindparam("ids", expanding=True)),
           InboundMail.state.not_in(FINAL_STATES))
)


def _wait_for_parents(ingestor: Ingestor, parent_ids: set[int], give_up: float) -> bool:
    """Whether every one of ``parent_ids`` reached a final state before ``give_up``.  False
    as well when the database cannot be asked: the replies then go to the caller's retry."""
    while True:
        try:
            with ingestor.sessions() as session:
                if not session.scalar(_PARENTS_WAITING, {"ids": sorted(parent_ids)}):
                    return True
        except OperationalError:
            return False
        if time.monotonic() + PARENT_POLL_SECONDS >= give_up:
            return False
        time.sleep(PARENT_POLL_SECONDS)


def _process_spooled(ingestor: Ingestor, inbound_ids: Sequence[int], deadline: float | None
                     ) -> SpooledResults:
    """One pass of :func:`process_inbound_many`: the fresh records as a batch, then the rest one
    by one: those the batch did not begin before the deadline (everything if it failed), and
    last, in the order their look-ups end, the mails whose senders' look-ups outlasted the
    batch's wait."""
    results = SpooledResults()
    evidence: Evidence = {}
    if _batches(ingestor, inbound_ids):
        evidence = _run_batch(ingestor, inbound_ids, deadline, results)
    slow = {found: inbound_id for inbound_id, found in evidence.items()
            if isinstance(found, Future)}
    known = {inbound_id: found for inbound_id, found in evidence.items()
             if not isinstance(found, Future)}
    rest = [i for i in inbound_ids if i not in results.infos and i not in results.deferred
            and i not in slow.values()]
    for position, inbound_id in enumerate(rest):
        if _past(deadline):
            results.left = [*rest[position:], *slow.values()]
            return results
        _process_alone(ingestor, inbound_id, known.get(inbound_id), results)
    try:
        for future in as_completed(slow, timeout=_remaining(deadline)):
            if _past(deadline):
                break
            inbound_id = slow.pop(future)
            # Its batch start counted while its checks ran (a DKIM check that kills the worker
            # counts); the one-by-one path counts its own.
            _forget_attempts(ingestor, [inbound_id])
            _process_alone(ingestor, inbound_id, future.result(), results)
    except TimeoutError:
        pass
    results.left.extend(slow.values())  # still counted: the next task runs them one by one
    return results


def _process_alone(ingestor: Ingestor, inbound_id: int,
                   evidence: SenderAuthentication | None, results: SpooledResults) -> None:
    try:
        results.infos[inbound_id] = process_inbound(ingestor, inbound_id, evidence)
    except ParentPending as pending:
        results.defer(inbound_id, pending)
    except InboundNotFound:
        results.missing.append(inbound_id)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# inbound id -> its sender evidence, worked out or still being looked up
Evidence = dict[int, SenderAuthentication | PendingEvidence]


def _run_batch(ingestor: Ingestor, inbound_ids: Sequence[int], deadline: float | None,
               results: SpooledResults) -> Evidence:
    """The fresh records among ``inbound_ids`` as one batch, into ``results``.  What it leaves
    goes to the caller's one-by-one pass: the mails whose preparation was not begun before
    ``deadline``, their starts taken back; all of them if the batch failed, their starts taken
    back too, unless the deadline has passed: the task then hands them back, and as started
    records the next task runs them one by one, which isolates a poison mail instead of
    failing the same batch again.  Returns the evidence of a failed batch's mails, for the
    one-by-one pass to reuse: a resolver caches answers, not a silent name server's timeouts.
    A mail whose sender's look-ups outlast :data:`~ingest.prepare.BATCH_EVIDENCE_WAIT_SECONDS`
    is left out of the batch too, still counted while its look-ups and DKIM check run on, and
    returned with the future of its evidence: the one-by-one pass runs it once they end, and
    the batch's other mails do not wait for it."""
    if _past(deadline):
        return {}  # nothing to begin: the one-by-one pass hands every mail back
    started = _start_fresh(ingestor, inbound_ids)
    if not started:
        return {}
    ahead, late = _prepare_ahead(ingestor, started, deadline)
    fresh = list(ahead)
    unbegun = [record.id for record in started if record.id not in ahead and record.id not in late]
    if unbegun:  # past the deadline: handed back, uncounted, by the one-by-one pass
        _forget_attempts(ingestor, unbegun)
    if not ahead:
        return dict(late)
    try:
        _process_spooled_batch(ingestor, ahead, results)
    except TransientError:
        with contextlib.suppress(Exception):  # best effort: the database may be down
            _forget_attempts(ingestor, fresh)
        raise
    except Exception as exc:  # one by one, from the records' unchanged state
        log.info("batch of %d spooled mails failed (%s: %s); one by one",
                 len(fresh), type(exc).__name__, exc)
        if not _past(deadline):
            _forget_attempts(ingestor, fresh)
        results.infos.clear()
        results.deferred.clear()
        results.parents.clear()
        return {**{inbound_id: mail.authentication for inbound_id, (_raw, mail) in ahead.items()
                   if mail is not None and mail.authentication is not None}, **late}
    return dict(late)


Ahead = dict[int, tuple[bytes, ParsedMail | None]]  # inbound id -> (bytes, prepared mail)


def _prepare_ahead(ingestor: Ingestor, started: list[InboundMail], deadline: float | None
                   ) -> tuple[Ahead, dict[int, PendingEvidence]]:
    """A batch's mails prepared before its transaction (as :func:`prepare_delivery` does for
    one): parsed in id order, none begun after ``deadline``, so that the task hands back in
    time what it has not begun; then the sender evidence of those parsed, their DNS look-ups
    side by side (:func:`~ingest.prepare.add_evidence_many`).  The mails whose look-ups are
    still running after :data:`~ingest.prepare.BATCH_EVIDENCE_WAIT_SECONDS` are taken out of
    the batch and returned apart, with the futures of their evidence."""
    settings = ingestor.settings
    ahead: Ahead = {}
    parsed: list[tuple[ParsedMail, InboundMail, bytes]] = []
    for record in started:
        if _past(deadline):
            break
        mail = prepare_mail(record.raw, settings.service.max_message_bytes)
        ahead[record.id] = (record.raw, mail)
        if mail is not None:
            parsed.append((mail, record, record.raw))
    late = add_evidence_many(parsed, settings, wait=BATCH_EVIDENCE_WAIT_SECONDS)
    for inbound_id in late:
        del ahead[inbound_id]
    return ahead, late


def _batches(ingestor: Ingestor, inbound_ids: Sequence[int]) -> bool:
    """Whether a task's fresh records may share a transaction.

    Only with ``max_attempts`` of 2 or more: a worker that dies in a batch leaves one counted
    start on every mail of it, which must not exhaust an innocent mail's attempts.  On SQLite
    the batch holds the one write lock, which the listener's spool writes wait for, but only for
    the database's work: parsing and DNS are done before the transaction, as for a mail alone.
    """
    return len(inbound_ids) > 1 and ingestor.settings.worker.max_attempts >= 2


# Larger mails run one by one: a batch holds all its mails' bytes and parses at once.
BATCH_MAX_MAIL_BYTES = 1024 * 1024
_START_FRESH = (
    update(InboundMail)
    .where(InboundMail.id.in_(bindparam("ids", expanding=True)),
           InboundMail.state.not_in(FINAL_STATES),
           func.coalesce(InboundMail.attempts, 0) == 0,
           InboundMail.size <= BATCH_MAX_MAIL_BYTES)
    .values(attempts=1)
    .returning(*InboundMail.__table__.columns)
)
_LOCK_RECORDS = (
    select(*_WITHOUT_RAW)
    .where(InboundMail.id.in_(bindparam("ids", expanding=True)))
    .order_by(InboundMail.id).with_for_update()
)
_FORGET_ATTEMPTS = (
    update(InboundMail)
    .where(InboundMail.id.in_(bindparam("ids", expanding=True)), InboundMail.attempts > 0,
           InboundMail.state.not_in(FINAL_STATES))
    .values(attempts=InboundMail.attempts - 1)
)


def read_ahead(session: Session, batch: BatchState, inbounds: Sequence[InboundMail],
               parsed: Sequence[ParsedMail | None], settings: Settings,
               spooled_parents: bool = False) -> None:
    """Read, with one query each, what a batch's parsed mails will look up one by one: the
    parents still spooled (a worker's, before the rest: see
    :func:`~ingest.steps.threading.read_spooled_parents`), the tickets of the Message-IDs they
    answer, the tickets those and their subject tags name, the messages the circuit breaker
    counts, and the persons they name.  A step finds its answer in ``batch`` (or the session)
    and asks the database only for what was not read here.  Each query per mail cost more CPU
    (SQLAlchemy and the driver) than the step's own work."""
    ready = [mail for mail in parsed if mail is not None]
    answered = [mid for mail in ready for mid in referenced_ids(mail)]
    if spooled_parents:
        read_spooled_parents(session, batch, answered)
    read_message_tickets(session, batch, answered)
    read_tickets(session, batch, ready, settings.service)
    batch.count_window = read_window(
        session, settings.limits,
        [(i, m) for i, m in zip(inbounds, parsed, strict=True) if m is not None],
        (ticket.id for ticket in batch.tickets))
    read_persons(session, ready)


def _write_batch(session: Session, batch: BatchState, infos: Iterable[TicketInfo]) -> None:
    """What a batch (replay or worker) keeps for its end: ticket counts, message rows, the new
    tickets' numbers (last: the counter row is locked from here to the commit), then the final
    states that name those rows and numbers.  ``infos`` (the batch's results so far) get the
    numbers too."""
    write_ticket_counts(session, batch)
    write_messages(session, batch)
    numbers = number_tickets(session, batch)
    if numbers:
        _replace_placeholders(batch, infos, numbers)
    if batch.final_states:
        session.connection().execute(_FINAL_STATE, batch.final_states)


def _replace_placeholders(batch: BatchState, infos: Iterable[TicketInfo],
                          numbers: dict[str, str]) -> None:
    """Put the numbers where the batch's mails recorded their tickets' placeholders: their
    TicketInfo (returned, and stored as each record's result, a duplicate's copy included)
    and the store step's trace line."""
    for info in infos:
        if info.TicketNumber in numbers:
            info.TicketNumber = numbers[info.TicketNumber]
    for state in batch.final_states:
        result = state["result"]
        if result and result.get("TicketNumber") in numbers:
            result["TicketNumber"] = numbers[result["TicketNumber"]]
        for line in state["trace"]:
            note = line.get("note") or ""
            if "(~" in note:
                for placeholder, number in numbers.items():
                    note = note.replace(placeholder, number)
                line["note"] = note


def _start_fresh(ingestor: Ingestor, inbound_ids: Sequence[int]) -> list[InboundMail]:
    """Count the start of the records never started before, in its own commit; those records
    as counted, in id order."""
    with ingestor.sessions() as session:
        try:
            rows = session.connection().execute(_START_FRESH, {"ids": list(inbound_ids)}).all()
            session.commit()
        except OperationalError as exc:
            raise TransientError(f"database unavailable: {exc.orig}") from exc
    return sorted((InboundMail(**row._mapping) for row in rows), key=lambda record: record.id)


def _forget_attempts(ingestor: Ingestor, inbound_ids: Sequence[int]) -> None:
    """Take back counted starts that did not fail: a deferral, a batch rolled back, a batch's
    mails not begun before the deadline."""
    with ingestor.sessions() as session:
        try:
            session.connection().execute(_FORGET_ATTEMPTS, {"ids": list(inbound_ids)})
            session.commit()
        except OperationalError as exc:  # the task is retried; the starts stay counted
            raise TransientError(f"database unavailable: {exc.orig}") from exc


def _process_spooled_batch(ingestor: Ingestor, ahead: Ahead, results: SpooledResults) -> None:
    # The mails come parsed (before the transaction, and before the look-ups, so that what
    # they look up is read with one query each).  On PostgreSQL other workers commit while the
    # batch runs: a parent they finish meanwhile defers its reply, and a person they create
    # meanwhile is taken from them.
    with ingestor.sessions() as session:
        try:
            rows = session.connection().execute(_LOCK_RECORDS, {"ids": sorted(ahead)}).all()
            inbounds = [InboundMail(**row._mapping, raw=ahead[row.id][0]) for row in rows]
            claims = list({spool.dedupe_claim(i.mailbox_id, i.idempotency_key) for i in inbounds})
            lock_claims(session, claims)  # a second delivery in another batch goes first
            batch = BatchState(claims=read_claims(session, claims))
            parsed = [ahead[inbound.id][1] for inbound in inbounds]
            read_ahead(session, batch, inbounds, parsed, ingestor.settings, spooled_parents=True)
            for inbound, mail in zip(inbounds, parsed, strict=True):
                if inbound.state in FINAL_STATES:  # finished by another worker meanwhile
                    results.infos[inbound.id] = (TicketInfo(**inbound.result) if inbound.result
                                                 else _stateless(inbound))
                    continue
                try:
                    info, _ctx = _process_in(session, inbound, inbound.raw, ingestor,
                                             can_defer=True, prepared=mail, batch=batch)
                except ParentPending as pending:  # raised before the mail wrote anything
                    results.defer(inbound.id, pending)
                    continue
                results.infos[inbound.id] = info
            _write_batch(session, batch, results.infos.values())
            if results.deferred:  # a deferral is not a failed attempt (the batch runs first)
                session.connection().execute(_FORGET_ATTEMPTS, {"ids": results.deferred})
            session.commit()
        except OperationalError as exc:
            session.rollback()
            if _lost_lock_race(exc):
                raise  # redone one by one at once, not retried behind the broker's backlog
            raise TransientError(f"database unavailable: {exc.orig}") from exc
        except Exception:
            session.rollback()
            raise
    for info in results.infos.values():
        _log(info)


def process_new(ingestor: Ingestor, inbound: InboundMail) -> TicketInfo:
    """Spool and process in one transaction (replay and other in-process callers).

    The caller holds the bytes and acknowledges nothing before this returns, so the spool record
    and the result can share one commit; if processing fails, the record is written on its own
    as ``quarantined`` so nothing is lost.
    """
    raw = inbound.raw
    prepared: ParsedMail | None = None
    for _race in range(MAX_KEY_RACES):
        prepared = prepare_delivery(inbound, raw, ingestor.settings,  # before the transaction
                                    prepared.authentication if prepared else None)
        with ingestor.sessions() as session:
            try:
                spool.insert_records(session.connection(), [inbound])
                info, _ctx = _process_in(session, inbound, raw, ingestor, prepared=prepared)
                session.commit()
                _log(info)
                return info
            except IntegrityError:
                session.rollback()
                inbound = _fresh_copy(inbound, raw)
                continue
            except OperationalError as exc:
                session.rollback()
                raise TransientError(f"database unavailable: {exc.orig}") from exc
            except Exception as exc:
                session.rollback()
                return _spool_and_quarantine(ingestor, _fresh_copy(inbound, raw), exc)
    return _spool_and_quarantine(
        ingestor, inbound, TransientError(f"lost {MAX_KEY_RACES} races on the same key")
    )


def process_new_batch(ingestor: Ingestor, inbounds: Sequence[InboundMail],
                      prepared: Sequence[ParsedMail | None] | None = None) -> list[TicketInfo]:
    """Spool and process several mails in one transaction (replay of stored mail).

    Exactly :func:`process_new` for each mail in order, with one commit for all of them: the
    commit (an fsync, and a round trip on PostgreSQL) was the largest single cost of a replayed
    mail.  If anything goes wrong, the whole batch is rolled back and run again mail by mail
    through :func:`process_new`, which quarantines the mail at fault.  The caller acknowledges
    nothing before this returns, so a crash loses nothing: a second replay finds what the first
    committed and answers ``duplicate``.  ``prepared`` holds each mail's parse done ahead
    (:mod:`ingest.prepare`'s helpers), or None where it is parsed here, before the transaction.
    """
    raws = [inbound.raw for inbound in inbounds]
    parsed = list(prepared) if prepared is not None else [None] * len(raws)
    max_bytes = ingestor.settings.service.max_message_bytes
    parsed = [mail if mail is not None else prepare_mail(raw, max_bytes)  # before the transaction
              for mail, raw in zip(parsed, raws, strict=True)]
    add_evidence_many([(mail, inbound, raw) for mail, inbound, raw
                       in zip(parsed, inbounds, raws, strict=True) if mail is not None],
                      ingestor.settings)
    infos: list[TicketInfo] = []
    with ingestor.sessions() as session:
        try:
            spool.insert_records(session.connection(), inbounds)
            batch = BatchState(claims=read_claims(session, list(
                {spool.dedupe_claim(i.mailbox_id, i.idempotency_key) for i in inbounds})))
            read_ahead(session, batch, inbounds, parsed, ingestor.settings)
            for inbound, raw, mail in zip(inbounds, raws, parsed, strict=True):
                infos.append(_process_in(session, inbound, raw, ingestor, prepared=mail,
                                         batch=batch)[0])
            _write_batch(session, batch, infos)
            session.commit()
        except Exception:  # each mail's own path below sorts it out
            session.rollback()
            # Parsed afresh: a step may have changed the mail objects of the failed run.
            return [process_new(ingestor, _fresh_copy(inbound, raw))
                    for inbound, raw in zip(inbounds, raws, strict=True)]
    for info in infos:
        _log(info)
    return infos


def _spool_and_quarantine(ingestor: Ingestor, inbound: InboundMail, exc: BaseException
                          ) -> TicketInfo:
    """Keep the bytes of a mail whose processing failed, as a replayable quarantined record."""
    with ingestor.sessions() as session:
        session.add(inbound)
        session.commit()
        inbound_id = inbound.id
    return quarantine(ingestor, inbound_id, exc)


def _fresh_copy(inbound: InboundMail, raw: bytes) -> InboundMail:
    copy = InboundMail(
        mailbox_id=inbound.mailbox_id, door=inbound.door, source=inbound.source, raw=raw,
        size=inbound.size, sha256=inbound.sha256, header_message_id=inbound.header_message_id,
        idempotency_key=inbound.idempotency_key, envelope_from=inbound.envelope_from,
        envelope_to=list(inbound.envelope_to or []), client_ip=inbound.client_ip,
        helo=inbound.helo, received_at=inbound.received_at, arrived_at=inbound.arrived_at,
        state="received", trace=[],
    )
    return copy


def quarantine(ingestor: Ingestor, inbound_id: int, exc: BaseException) -> TicketInfo:
    """Record the failure on the spooled mail; the raw bytes stay for ``quarantine replay``."""
    trace: Trace = getattr(exc, "trace", None) or Trace()
    error = f"{type(exc).__name__}: {exc}"
    trace.add("quarantine", error, traceback=traceback.format_exception(exc)[-3:])
    log.warning("inbound %s quarantined: %s", inbound_id, error,
                extra={"inbound_id": inbound_id, "action": "quarantined"})
    with ingestor.sessions() as session:
        inbound = session.get(InboundMail, inbound_id, with_for_update=True)
        if inbound is None:
            raise InboundNotFound(f"no inbound mail {inbound_id}") from exc
        info = TicketInfo(
            Action="quarantined", Reason=error[:2000], MessageId=inbound.header_message_id,
            InboundId=inbound.id,
        )
        inbound.state = "quarantined"
        inbound.reason = "processing failed"
        inbound.error = error[:10000]
        inbound.trace = trace.lines
        inbound.result = info.model_dump()
        inbound.processed_at = utcnow()
        session.commit()
    return info


def _stateless(inbound: InboundMail) -> TicketInfo:
    return TicketInfo(Action=inbound.state, Reason=inbound.reason, InboundId=inbound.id,
                      MessageId=inbound.header_message_id, TicketId=inbound.ticket_id or 0)


def _log(info: TicketInfo) -> None:
    log.info("inbound %s %s ticket=%s %s", info.InboundId, info.Action, info.TicketId or "-",
             info.Reason or "", extra={"inbound_id": info.InboundId,
                                       "ticket_id": info.TicketId or None, "action": info.Action})


"""The entry point of the library: one :class:`Ingestor` per process.

Doors (SMTP, IMAP, HTTP, replay, the Celery task) call :meth:`Ingestor.receive` to spool and
:meth:`Ingestor.process` to run the pipeline, or :meth:`Ingestor.ingest` for both at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ingest import schema, spool
from ingest.config import Settings
from ingest.db import make_engine, make_session_factory
from ingest.errors import (
    InboundNotFound,
    InvalidMail,
    NotQuarantined,
    SpoolError,
    UnknownMailbox,
)
from ingest.models import InboundMail, utcnow
from ingest.reference import Reference, sync_reference
from ingest.spool import Envelope
from ingest.ticketinfo import TicketInfo

if TYPE_CHECKING:  # not imported at run time: the listener never loads the parser
    from ingest.parse import ParsedMail
    from ingest.pipeline import SpooledResults


def _pipeline() -> ModuleType:
    """``ingest.pipeline``, imported on first use rather than at the top: the SMTP listener and
    the IMAP poller only spool, and the pipeline's imports (mail-parser, lxml, nh3, dkimpy...)
    were a fifth of their resident memory."""
    from ingest import pipeline

    return pipeline


class RecordedError(InvalidMail):
    """Input refused before processing; the refusal itself is recorded under ``inbound_id``."""

    def __init__(self, message: str, inbound_id: int, info: TicketInfo) -> None:
        super().__init__(message)
        self.inbound_id = inbound_id
        self.info = info


@dataclass(frozen=True, slots=True)
class SpoolRequest:
    """One mail for :meth:`Ingestor.receive_group`: its bytes, the mailboxes it goes to (one
    record each) and what the door knew."""

    raw: bytes
    mailbox_ids: list[int]
    source: str = ""
    envelope: Envelope | None = None


@dataclass(frozen=True, slots=True)
class Spooled:
    """One mail handed to :meth:`Ingestor.receive_batch`."""

    inbound_id: int
    state: str  # "received" unless an earlier run already processed it
    new: bool  # False: this very source had been spooled before (a re-fetch)


class Ingestor:
    def __init__(self, settings: Settings, *, engine: Engine | None = None,
                 upgrade_schema: bool = True) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.effective_database_url)
        self.sessions = make_session_factory(self.engine)
        if upgrade_schema:
            schema.upgrade(self.engine)
        self.reference: Reference = self._sync_reference()

    def _sync_reference(self, attempts: int = 3) -> Reference:
        """Write the configured reference data.  Roles started at the same moment on a fresh
        PostgreSQL database (separate containers) race to insert the same rows; the loser's
        unique violation is answered by reading what the winner committed."""
        for attempt in range(1, attempts + 1):
            with self.sessions() as session:
                try:
                    reference = sync_reference(session, self.settings)
                    session.commit()
                    return reference
                except IntegrityError:
                    session.rollback()
                    if attempt == attempts:
                        raise
        raise AssertionError("unreachable")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # --- doors ---------------------------------------------------------------------------

    def receive(self, raw: bytes, mailbox_id: int, door: str, source: str = "",
                envelope: Envelope | None = None) -> int:
        """Durably spool a mail and return its inbound id.  Acknowledge only after this returns.

        Raises :class:`~ingest.errors.SpoolError` when the database refuses the write.
        """
        inbound = spool.new_inbound(raw, mailbox_id, door, source, envelope)
        return spool.store(self.engine, inbound)

    def receive_many(self, raw: bytes, mailbox_ids: list[int], door: str, source: str = "",
                     envelope: Envelope | None = None) -> list[int]:
        """One record per mailbox, all committed together (one SMTP transaction, many RCPTs)."""
        records = [spool.new_inbound(raw, m, door, source, envelope) for m in mailbox_ids]
        spool.store_all(self.engine, records)
        return [r.id for r in records]

    def receive_group(self, requests: Sequence[SpoolRequest], door: str
                      ) -> list[list[int] | SpoolError]:
        """Spool several independent mails with one commit (group commit): per request, its
        inbound ids, or the :class:`SpoolError` that kept it out.

        The SMTP listener gathers the mails its concurrent sessions finish while the previous
        commit runs; one transaction and one commit for all of them cost the database and the
        listener far less than one each.  The requests are unrelated, so one that the database
        refuses (text it cannot store, a full disk) must not fail the others: when the group's
        transaction fails, it is rolled back and every request is tried again on its own.
        """
        records = [[spool.new_inbound(r.raw, m, door, r.source, r.envelope)
                    for m in r.mailbox_ids] for r in requests]
        try:
            spool.store_all(self.engine, [record for group in records for record in group])
        except SpoolError as exc:
            if len(requests) == 1:
                return [exc]
        else:
            return [[record.id for record in group] for group in records]
        results: list[list[int] | SpoolError] = []
        for request in requests:
            try:
                results.append(self.receive_many(request.raw, request.mailbox_ids, door,
                                                 request.source, request.envelope))
            except SpoolError as exc:
                results.append(exc)
        return results

    def receive_batch(self, items: Sequence[tuple[bytes, str]], mailbox_id: int, door: str,
                      envelope: Envelope | None = None,
                      arrived: Sequence[dt.datetime | None] | None = None) -> list[Spooled]:
        """Spool several ``(raw, source)`` mails in one transaction, each source at most once.

        For doors that may fetch the same mail again (IMAP: killed after spooling, before the
        server flag was set): a mail whose mailbox, door, idempotency key and source are already
        in the spool gets its existing record back (``new=False``) instead of a second one.
        ``arrived`` (one per item, or None) is when each mail reached the mail system, if the
        door knows (IMAP INTERNALDATE).
        Raises :class:`~ingest.errors.SpoolError`, with nothing written, if the database fails.
        """
        records = [spool.new_inbound(raw, mailbox_id, door, source, envelope)
                   for raw, source in items]
        for record, when in zip(records, arrived or [], strict=False):
            record.arrived_at = spool.arrival(when)
        with spool.transaction(self.engine) as connection:
            found = {
                (row.idempotency_key, row.source): row
                for row in connection.execute(
                    select(InboundMail.id, InboundMail.state, InboundMail.source,
                           InboundMail.idempotency_key)
                    .where(InboundMail.mailbox_id == mailbox_id, InboundMail.door == door,
                           InboundMail.idempotency_key.in_(
                               {r.idempotency_key for r in records}))
                )
            }
            spool.insert_records(
                connection, [r for r in records if (r.idempotency_key, r.source) not in found])
        result = []
        for record in records:
            old = found.get((record.idempotency_key, record.source))
            result.append(Spooled(old.id, old.state, False) if old is not None
                          else Spooled(record.id, record.state, True))
        return result

    def record_rejected(self, mailbox_id: int, door: str, source: str, reason: str, *,
                        head: bytes = b"", size: int | None = None,
                        envelope: Envelope | None = None) -> TicketInfo:
        """Record a mail refused before its bytes were taken (IMAP: RFC822.SIZE over the limit).

        ``head`` is what the door knows of it, e.g. a few header fields; it is stored as the
        record's raw bytes and gives the record its Message-ID.  ``size`` is the real size.
        Idempotent per source: the same source refused again returns the first record's result.
        """
        inbound = spool.new_inbound(head, mailbox_id, door, source, envelope)
        if size is not None:
            inbound.size = size
        with self.sessions() as session:
            first = session.scalar(
                select(InboundMail).where(
                    InboundMail.mailbox_id == mailbox_id, InboundMail.door == door,
                    InboundMail.idempotency_key == inbound.idempotency_key,
                    InboundMail.source == inbound.source))
            if first is not None:
                return (TicketInfo(**first.result) if first.result
                        else TicketInfo(Action=first.state, InboundId=first.id))
        return self._record_refusal(inbound, reason)

    def backlog(self) -> int:
        """Spooled mails not yet processed: the measure for SMTP backpressure."""
        with self.sessions() as session:
            return int(session.scalar(
                select(func.count()).select_from(InboundMail)
                .where(InboundMail.state == "received")) or 0)

    def stuck_inbound_ids(self, older_than_seconds: float, limit: int = 1000) -> list[int]:
        """Records still ``received`` whose last hand-off to the broker is older than this: their
        task was lost (broker restart, killed worker).  They are marked as handed off now, so a
        long backlog is not enqueued again at every sweep."""
        now = utcnow()
        cutoff = now - dt.timedelta(seconds=older_than_seconds)
        with self.sessions() as session:
            ids = list(session.scalars(
                select(InboundMail.id)
                .where(InboundMail.state == "received",
                       or_(InboundMail.enqueued_at.is_(None), InboundMail.enqueued_at < cutoff))
                .order_by(InboundMail.id).limit(limit)))
            if ids:
                session.execute(update(InboundMail).where(InboundMail.id.in_(ids))
                                .values(enqueued_at=now))
                session.commit()
            return ids

    def process(self, inbound_id: int) -> TicketInfo:
        return _pipeline().process_inbound(self, inbound_id)

    def process_many(self, inbound_ids: Sequence[int], deadline: float | None = None,
                     parent_wait: float = 0.0) -> SpooledResults:
        """:meth:`process` for a worker task's ids, fresh ones in one transaction; replies
        whose parent is in progress elsewhere wait up to ``parent_wait`` s for it."""
        return _pipeline().process_inbound_many(self, inbound_ids, deadline, parent_wait)

    def ingest(self, raw: bytes, mailbox_id: int, door: str = "replay", source: str = "",
               envelope: Envelope | None = None) -> TicketInfo:
        """Spool and process in one go.  Unknown mailboxes and non-mail data are recorded as
        ``rejected`` and raised as :class:`RecordedError`."""
        return _pipeline().process_new(self, self._admit(raw, mailbox_id, door, source, envelope))

    def _admit(self, raw: bytes, mailbox_id: int, door: str, source: str,
               envelope: Envelope | None = None, digest: tuple[str, str | None] | None = None
               ) -> InboundMail:
        """The spool record of an in-process delivery, or :class:`RecordedError` (recorded as
        ``rejected``) for an unknown mailbox or data that is not a mail.  ``digest``: the
        bytes' SHA-256 and header Message-ID, when a replay helper computed them already."""
        inbound = spool.new_inbound(raw, mailbox_id, door, source, envelope, digest)
        try:
            self.settings.mailbox_for(mailbox_id)
            spool.check_rfc822(raw)
        except (UnknownMailbox, InvalidMail) as exc:
            info = self._record_refusal(inbound, str(exc))
            raise RecordedError(str(exc), info.InboundId or 0, info) from exc
        return inbound

    def ingest_many(self, mails: Iterable[tuple[bytes, str]], mailbox_id: int,
                    door: str = "replay", batch_size: int | None = None,
                    parse_helpers: int | None = None,
                    ) -> Iterator[tuple[str, TicketInfo | RecordedError]]:
        """:meth:`ingest` for a stream of ``(raw, source)`` mails, committed ``batch_size`` at a
        time (:func:`~ingest.pipeline.process_new_batch`).  Yields ``(source, result)`` in input
        order once the mail's batch is committed; refused input as a :class:`RecordedError`.

        A long stream is parsed ahead by ``parse_helpers`` helper processes
        (:mod:`ingest.prepare`); both default to the ``[replay]`` settings.
        """
        from ingest.prepare import Preparer, default_helpers

        replay = self.settings.replay
        batch_size = batch_size or replay.batch_size
        if parse_helpers is None:
            parse_helpers = default_helpers() if replay.parse_helpers is None \
                else replay.parse_helpers
        batch: list[tuple[str, InboundMail | RecordedError, ParsedMail | None]] = []
        with Preparer(parse_helpers, self.settings.service.max_message_bytes) as preparer:
            for raw, source, prepared in preparer.stream(mails):
                digest = (prepared.sha256, prepared.message_id) if prepared else None
                try:
                    batch.append((source, self._admit(raw, mailbox_id, door, source,
                                                      digest=digest),
                                  prepared.mail if prepared else None))
                except RecordedError as refused:
                    batch.append((source, refused, None))
                if len(batch) >= batch_size:
                    yield from self._ingest_batch(batch)
                    batch = []
            yield from self._ingest_batch(batch)

    def _ingest_batch(self, batch: list[tuple[str, InboundMail | RecordedError, ParsedMail | None]]
                      ) -> Iterator[tuple[str, TicketInfo | RecordedError]]:
        pending = [(entry, parsed) for _source, entry, parsed in batch
                   if isinstance(entry, InboundMail)]
        infos = iter(_pipeline().process_new_batch(
            self, [entry for entry, _ in pending], [parsed for _, parsed in pending])
            if pending else [])
        for source, entry, _parsed in batch:
            yield source, (next(infos) if isinstance(entry, InboundMail) else entry)

    def _record_refusal(self, inbound: InboundMail, reason: str) -> TicketInfo:
        with self.sessions() as session:
            session.add(inbound)
            session.flush()
            info = TicketInfo(Action="rejected", Reason=reason, InboundId=inbound.id,
                              MessageId=inbound.header_message_id)
            inbound.state = "rejected"
            inbound.reason = reason
            inbound.result = info.model_dump()
            inbound.processed_at = utcnow()
            inbound.trace = [{"step": "receive", "ms": 0, "note": reason}]
            session.commit()
            return info

    # --- quarantine ----------------------------------------------------------------------

    def replay_quarantined(self, inbound_id: int) -> TicketInfo:
        with self.sessions() as session:
            inbound = session.get(InboundMail, inbound_id, with_for_update=True)
            if inbound is None:
                raise InboundNotFound(f"no inbound mail {inbound_id}")
            if inbound.state != "quarantined":
                raise NotQuarantined(
                    f"inbound mail {inbound_id} is {inbound.state}, not quarantined"
                )
            inbound.state = "received"
            inbound.result = None
            inbound.attempts = 0  # a released mail gets its full number of attempts again
            session.commit()
        return self.process(inbound_id)

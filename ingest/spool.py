"""The durable spool: the raw mail and its envelope, committed before any door says "accepted".

The record is the unit of idempotency.  Its key is the Message-ID (per mailbox), or the SHA-256 of
the raw bytes when there is none (design.md, invariant 2); the key is computed from the header
block alone so that receiving stays cheap even for a 30 MB mail.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ingest.errors import InvalidMail, SpoolError
from ingest.message_ids import normalize_message_id
from ingest.models import InboundMail, utcnow

_HEADER_PARSER = BytesHeaderParser(policy=compat32)
MAX_KEY_MESSAGE_ID = 250
# A field name of printable ASCII but ":", then optional white space (RFC 5322 obsolete syntax
# allows "Subject  :"), then the colon.
# The inbound columns a new record can carry (the id comes back from the INSERT).
_SPOOLED_COLUMNS = tuple(c.key for c in InboundMail.__table__.columns if c.key != "id")
_INSERT_RETURNING_ID = insert(InboundMail).returning(InboundMail.id, sort_by_parameter_order=True)
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


@dataclass(slots=True)
class Envelope:
    """What the door knew besides the bytes (SMTP: MAIL FROM, RCPT TO, peer; IMAP: uid...)."""

    mail_from: str | None = None
    rcpt_to: list[str] = field(default_factory=list)
    client_ip: str | None = None
    helo: str | None = None
    arrived_at: dt.datetime | None = None  # known earlier arrival (IMAP INTERNALDATE), aware


def header_message_id(raw: bytes) -> str | None:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw[:end] if end >= 0 else raw  # the header block only: no copy of a large body
    try:
        found = normalize_message_id(_HEADER_PARSER.parsebytes(head).get("Message-ID"))
    except Exception:  # a hostile header block still gets a key: the SHA-256
        return None
    # A control character (NUL above all) is no part of a Message-ID, and PostgreSQL refuses NUL
    # in text: such an id would make the spool write itself fail.  The SHA-256 key is used then.
    if found is not None and any(ord(c) < 32 or ord(c) == 127 for c in found):
        return None
    return found


def raw_digest(raw: bytes) -> tuple[str, str | None]:
    """The SHA-256 (hex) and the header Message-ID of a mail: what its spool record is keyed
    by (see :func:`idempotency_key`)."""
    return hashlib.sha256(raw).hexdigest(), header_message_id(raw)


def idempotency_key(message_id: str | None, sha256: str) -> str:
    if message_id:
        if len(message_id) > MAX_KEY_MESSAGE_ID:
            return "mid-sha256:" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()
        return "mid:" + message_id
    return "sha256:" + sha256


def dedupe_claim(mailbox_id: int, key: str) -> str:
    return f"{mailbox_id}:{key}"


def check_rfc822(raw: bytes) -> None:
    """Refuse what is plainly not a mail, so callers can answer 400/554 instead of storing junk."""
    if not raw or not raw.strip():
        raise InvalidMail("empty message")
    head = raw[:4096].lstrip()
    first_line = head.split(b"\n", 1)[0]
    if first_line.startswith(b"From ") and b"\n" in head:  # mbox "From " line before headers
        first_line = head.split(b"\n", 2)[1] if head.count(b"\n") > 1 else b""
    if not _HEADER_LINE.match(first_line):
        raise InvalidMail("data does not start with an RFC822 header line (Name: value)")


def new_inbound(
    raw: bytes,
    mailbox_id: int,
    door: str,
    source: str = "",
    envelope: Envelope | None = None,
    digest: tuple[str, str | None] | None = None,
) -> InboundMail:
    """A spool record, not yet stored.  ``digest`` is ``(SHA-256 hex, header Message-ID)`` of
    ``raw`` when the caller computed them already (replay helpers, ingest.prepare)."""
    envelope = envelope or Envelope()
    sha256, message_id = digest or raw_digest(raw)
    return InboundMail(
        mailbox_id=mailbox_id,
        door=door,
        source=source[:2000],
        raw=raw,
        size=len(raw),
        sha256=sha256,
        header_message_id=message_id,
        idempotency_key=idempotency_key(message_id, sha256),
        envelope_from=envelope.mail_from,
        envelope_to=list(envelope.rcpt_to),
        client_ip=envelope.client_ip,
        helo=envelope.helo,
        received_at=utcnow(),
        arrived_at=arrival(envelope.arrived_at),
        state="received",
        trace=[],
    )


def arrival(when: dt.datetime | None) -> dt.datetime | None:
    """UTC, and never in the future (a server clock ahead of ours)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(when.astimezone(dt.UTC), utcnow())


def store(engine: Engine, inbound: InboundMail) -> int:
    """Commit the record; raise :class:`SpoolError` (nothing half-written) if that fails."""
    store_all(engine, [inbound])
    return inbound.id


def insert_records(connection: Connection, records: Sequence[InboundMail]) -> None:
    """INSERT the records in the connection's transaction, uncommitted; their ids are set on
    them.

    One multi-row INSERT ... RETURNING, not the ORM's unit of work: this runs before every SMTP
    ``250``, where the ORM's bookkeeping was a quarter of the listener's time per mail.  The
    records stay outside any session; the pipeline writes their final state with one UPDATE
    (:func:`ingest.pipeline.record_outcome`).
    """
    if not records:
        return
    rows = [{key: getattr(record, key) for key in _SPOOLED_COLUMNS if key in vars(record)}
            for record in records]
    ids = connection.execute(_INSERT_RETURNING_ID, rows).scalars().all()
    for record, inbound_id in zip(records, ids, strict=True):
        record.id = inbound_id


# SQLAlchemy writes up to this many records as one INSERT statement (its "insertmanyvalues"
# pages hold up to 1,000 rows and 32,767 parameters; a record has about 20 columns).
ONE_STATEMENT_RECORDS = 32


@contextmanager
def transaction(engine: Engine, *, one_statement: bool = False) -> Iterator[Connection]:
    """A spool write's transaction on a plain connection, committed at the end, rolled back
    and raised as :class:`SpoolError` on any failure.

    No ORM session: a session's set-up, bookkeeping and teardown cost more CPU than the INSERT
    itself, and the SMTP listener runs one such transaction per group of mails, often of one
    mail.  Also the driver's refusal of unstorable text (e.g. surrogates from a bad HELO) is a
    SpoolError: the caller must see one error type and answer "try later", never a crash.

    ``one_statement``: the caller runs a single statement.  On PostgreSQL it then runs on an
    autocommit connection, where it is its own transaction, committed (and flushed to disk)
    before its result comes back: one round trip instead of three (BEGIN, the statement,
    COMMIT).  At moderate rates, where the listener's groups hold one mail, that took a third
    of the server's CPU for the write and a fifth of its time."""
    try:
        if one_statement and engine.dialect.name == "postgresql":
            with engine.connect() as connection:
                yield connection.execution_options(isolation_level="AUTOCOMMIT")
        else:
            with engine.begin() as connection:
                yield connection
    except (SQLAlchemyError, UnicodeError, ValueError) as exc:
        raise SpoolError(f"could not store the mail: {exc.__class__.__name__}: {exc}") from exc


def store_all(engine: Engine, records: list[InboundMail]) -> None:
    """Commit all records in one transaction (or one statement), or none of them; their ids
    are set on them.

    A write that met a dead pooled connection (the server restarted or cut it less than
    :data:`ingest.db.PING_AFTER_IDLE_SECONDS` after its last use, so it was not pinged) is
    tried once more: the pool has dropped that connection, and the caller should not answer
    "try later" for a database that is up."""
    if not records:
        return
    for last_try in (False, True):
        try:
            with transaction(engine, one_statement=len(records) <= ONE_STATEMENT_RECORDS
                             ) as connection:
                insert_records(connection, records)
            return
        except SpoolError as exc:
            cause = exc.__cause__
            if last_try or not (isinstance(cause, DBAPIError) and cause.connection_invalidated):
                raise

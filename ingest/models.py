"""The SQLAlchemy schema: SuperOffice-shaped tickets, their messages, and the inbound spool.

Column names follow the SuperOffice TicketEntity (seed 001) where a ticket has the field, so the
HTTP layer maps one to one.  Every timestamp is stored in UTC (Autotask rule, seed 004): the
:class:`UTCDateTime` type refuses naive datetimes on the way in and hands back aware ones.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC on both SQLite (which has no time zones) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; ticketgate stores UTC only")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


# --- reference data (mirrors the configuration, synchronised at start) -----------------------


class Associate(Base):
    __tablename__ = "associates"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    full_name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str | None] = mapped_column(String(320))


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Priority(Base):
    __tablename__ = "priorities"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    deadline_hours: Mapped[float | None] = mapped_column(Float)


class Status(Base):
    __tablename__ = "statuses"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_status: Mapped[str] = mapped_column(String(20), default="active")
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Contact(Base):
    """A company (SuperOffice "contact")."""

    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    domains: Mapped[list[ContactDomain]] = relationship(back_populates="contact")


class ContactDomain(Base):
    __tablename__ = "contact_domains"
    id: Mapped[int] = mapped_column(primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    domain: Mapped[str] = mapped_column(String(255), unique=True)
    contact: Mapped[Contact] = relationship(back_populates="domains")


class Person(Base):
    __tablename__ = "persons"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased, normalised
    first_name: Mapped[str] = mapped_column(String(200), default="")
    last_name: Mapped[str] = mapped_column(String(200), default="")
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"))
    origin: Mapped[str] = mapped_column(String(20), default="mail")  # config | mail | api
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    contact: Mapped[Contact | None] = relationship()

    @property
    def full_name(self) -> str:
        return " ".join(p for p in (self.first_name, self.last_name) if p) or self.email


class MailboxRow(Base):
    __tablename__ = "mailboxes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    addresses: Mapped[list[Any]] = mapped_column(default=list)


# --- tickets --------------------------------------------------------------------------------


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_number: Mapped[str] = mapped_column(String(32), unique=True)  # TYYYYMMDD.NNNN
    title: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_changed: Mapped[dt.datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column()
    replied_at: Mapped[dt.datetime | None] = mapped_column()
    deadline: Mapped[dt.datetime | None] = mapped_column()
    author: Mapped[str] = mapped_column(String(400), default="")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("associates.id"))
    owned_by_id: Mapped[int | None] = mapped_column(ForeignKey("associates.id"))
    category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"))
    priority_id: Mapped[int | None] = mapped_column(ForeignKey("priorities.id"))
    status_id: Mapped[int | None] = mapped_column(ForeignKey("statuses.id"))
    base_status: Mapped[str] = mapped_column(String(20), default="active")
    slevel: Mapped[str] = mapped_column(String(20), default="external")
    origin: Mapped[str] = mapped_column(String(30), default="Mail")
    person_id: Mapped[int | None] = mapped_column(ForeignKey("persons.id"))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"))
    mailbox_id: Mapped[int | None] = mapped_column(Integer)
    from_address: Mapped[str] = mapped_column(String(320), default="")
    num_messages: Mapped[int] = mapped_column(default=0)
    num_replies: Mapped[int] = mapped_column(default=0)
    has_attachment: Mapped[bool] = mapped_column(Boolean, default=False)
    language: Mapped[str | None] = mapped_column(String(10))
    tags: Mapped[list[Any]] = mapped_column(default=list)
    connect_id: Mapped[int | None] = mapped_column(Integer)  # follow-up of a closed ticket
    reopen_count: Mapped[int] = mapped_column(default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    # Opened by a mail whose sender failed SPF/DKIM/DMARC (ingest/authentication.py).
    unverified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    owner: Mapped[Associate | None] = relationship(foreign_keys=[owned_by_id])
    created_by: Mapped[Associate | None] = relationship(foreign_keys=[created_by_id])
    category: Mapped[Category | None] = relationship()
    priority: Mapped[Priority | None] = relationship()
    status: Mapped[Status | None] = relationship()
    person: Mapped[Person | None] = relationship()
    contact: Mapped[Contact | None] = relationship()
    messages: Mapped[list[Message]] = relationship(
        back_populates="ticket", order_by="Message.id"
    )
    secondary_persons: Mapped[list[Person]] = relationship(secondary="ticket_secondary_persons")


class TicketSecondaryPerson(Base):
    __tablename__ = "ticket_secondary_persons"
    ticket_id: Mapped[int] = mapped_column(
        ForeignKey("tickets.id", ondelete="CASCADE"), primary_key=True
    )
    person_id: Mapped[int] = mapped_column(ForeignKey("persons.id"), primary_key=True)


class TicketNumberCounter(Base):
    """One row per UTC day; the Autotask-style ticket number's sequence part."""

    __tablename__ = "ticket_number_counters"
    day: Mapped[str] = mapped_column(String(8), primary_key=True)
    last: Mapped[int] = mapped_column(default=0)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_message_id", "message_id"),
        Index("ix_messages_from_arrived", "from_address", "arrived_at"),  # circuit breaker
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_mails.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column()
    message_id: Mapped[str | None] = mapped_column(String(998))
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    from_address: Mapped[str] = mapped_column(String(320), default="")
    from_name: Mapped[str] = mapped_column(String(400), default="")
    to: Mapped[list[Any]] = mapped_column(default=list)
    cc: Mapped[list[Any]] = mapped_column(default=list)
    headers: Mapped[str] = mapped_column(Text, default="")
    body_text: Mapped[str] = mapped_column(Text, default="")
    visible_text: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str] = mapped_column(Text, default="")  # sanitised with nh3, never raw
    slevel: Mapped[str] = mapped_column(String(20), default="external")
    kind: Mapped[str] = mapped_column(String(20), default="normal")  # normal|auto-reply|bounce|bulk
    author: Mapped[str] = mapped_column(String(400), default="")
    person_id: Mapped[int | None] = mapped_column(ForeignKey("persons.id"))
    language: Mapped[str | None] = mapped_column(String(10))
    important: Mapped[bool] = mapped_column(Boolean, default=False)
    # Sender authentication: pass | fail | temperror | none (no evidence); the SPF, DKIM and
    # DMARC details; and whether the sender was treated as unverified (ingest/authentication.py).
    auth_verdict: Mapped[str | None] = mapped_column(String(20))
    authentication: Mapped[dict[str, Any] | None] = mapped_column()
    unverified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    subject_key: Mapped[str | None] = mapped_column(String(64))  # circuit breaker, see there
    # When the mail reached the mail system (the inbound record's arrived_at, else its
    # received_at): the circuit breaker counts arrivals, not processing.
    arrived_at: Mapped[dt.datetime | None] = mapped_column()
    ticket: Mapped[Ticket] = relationship(back_populates="messages")
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="message", order_by="Attachment.id"
    )


class Attachment(Base):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    content_id: Mapped[str | None] = mapped_column(String(998))
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    origin: Mapped[str] = mapped_column(String(20), default="mime")  # mime | tnef
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    message: Mapped[Message] = relationship(back_populates="attachments")


# --- the spool ------------------------------------------------------------------------------


class InboundMail(Base):
    """One delivery of one mail to one mailbox: the durable spool and its outcome.

    A row is written (and committed) before any door acknowledges the mail.  ``state`` moves from
    ``received`` to exactly one final state.  ``dedupe_claim`` is set only on the record that owns
    the result for its idempotency key; the unique index makes that race-free across workers.
    """

    __tablename__ = "inbound_mails"
    __table_args__ = (
        UniqueConstraint("dedupe_claim", name="uq_inbound_dedupe_claim"),
        Index("ix_inbound_state", "state"),
        Index("ix_inbound_key", "mailbox_id", "idempotency_key"),
        Index("ix_inbound_header_message_id", "header_message_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(Integer)
    door: Mapped[str] = mapped_column(String(20))  # smtp | imap | http | replay
    source: Mapped[str] = mapped_column(Text, default="")  # file path, IMAP uid, peer...
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # When the mail reached the mail system, if the door knows an earlier time than its own
    # receipt (IMAP: the server's INTERNALDATE); None: received_at.
    arrived_at: Mapped[dt.datetime | None] = mapped_column()
    raw: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    header_message_id: Mapped[str | None] = mapped_column(String(998))
    idempotency_key: Mapped[str] = mapped_column(String(1100))
    envelope_from: Mapped[str | None] = mapped_column(String(998))
    envelope_to: Mapped[list[Any]] = mapped_column(default=list)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    helo: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(20), default="received")
    reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    trace: Mapped[list[Any]] = mapped_column(default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column()
    ticket_id: Mapped[int | None] = mapped_column(Integer, index=True)
    ticket_message_id: Mapped[int | None] = mapped_column(Integer)
    duplicate_of_id: Mapped[int | None] = mapped_column(Integer)
    dedupe_claim: Mapped[str | None] = mapped_column(String(1200))
    attempts: Mapped[int] = mapped_column(default=0)  # processing starts, counted before each
    # When a task for this record was last handed to the broker; the sweep re-enqueues only
    # records whose last hand-off is older than worker.sweep_age.
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(default=utcnow)
    processed_at: Mapped[dt.datetime | None] = mapped_column()


FINAL_STATES = ("created", "appended", "duplicate", "ignored", "rejected", "quarantined")


# --- the IMAP poller's position ------------------------------------------------------------


class ImapFolderState(Base):
    """Where the IMAP poller stands in one mailbox's folder (``workers/imap.py``).

    ``last_uid`` is the highest UID whose mail is spooled *and* acknowledged on the server
    (flagged, moved or deleted); it is valid only for ``uidvalidity`` on ``account``.  A folder
    whose UIDVALIDITY (or account) changed is synchronised again from scratch; the spool's
    idempotency key keeps that from making a second ticket.  ``uidvalidity`` stays NULL until
    the first full synchronisation has finished.
    """

    __tablename__ = "imap_folder_state"
    __table_args__ = (UniqueConstraint("mailbox_id", "folder", name="uq_imap_mailbox_folder"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(Integer)
    folder: Mapped[str] = mapped_column(String(1000))
    account: Mapped[str] = mapped_column(String(1000), default="")  # user@host:port
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    ingested: Mapped[int] = mapped_column(BigInteger, default=0)  # mails spooled, ever
    last_success_at: Mapped[dt.datetime | None] = mapped_column()  # last completed sync
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[dt.datetime | None] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

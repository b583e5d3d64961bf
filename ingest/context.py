"""The typed context every pipeline step reads and extends, and the outcome that ends it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.orm import Session

from ingest.authentication import SenderAuthentication
from ingest.classification import Classification
from ingest.config import Mailbox, Settings
from ingest.models import Contact, InboundMail, Person, Ticket
from ingest.parse import ParsedMail
from ingest.reference import Reference

if TYPE_CHECKING:
    from ingest.steps.circuit_breaker import CountWindow

Action = Literal["created", "appended", "duplicate", "ignored", "rejected", "quarantined"]


@dataclass(slots=True)
class Outcome:
    """How processing ended.  ``created``/``appended`` come from the store step only."""

    action: Action
    reason: str | None = None
    ticket: Ticket | None = None
    result: dict[str, Any] | None = None  # for duplicates: the first delivery's TicketInfo
    duplicate_of: int | None = None


@dataclass(slots=True)
class Routing:
    category: str | None = None
    priority: str | None = None
    owner: str | None = None
    status: str | None = None
    tags: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Trace:
    """One line per step, stored on the inbound record: the answer to "what happened to my mail"."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    def add(self, step: str, note: str, **data: Any) -> dict[str, Any]:
        line: dict[str, Any] = {
            "step": step,
            "ms": round((time.perf_counter() - self._started) * 1000, 2),
            "note": note,
        }
        if data:
            line.update(data)
        self.lines.append(line)
        return line


@dataclass(frozen=True, slots=True)
class Claim:
    """The inbound record that owns the result for an idempotency key (see ingest.spool)."""

    inbound_id: int
    state: str
    result: dict[str, Any] | None


@dataclass(slots=True)
class PendingMessage:
    """A batch's message row, written with the batch's others (ingest.steps.store)."""

    row: dict[str, Any]
    attachments: list[dict[str, Any]]
    ctx: MailContext
    trace_line: dict[str, Any]  # the store step's line, which names the row id once written


@dataclass(slots=True)
class BatchState:
    """What the mails of one batch (a replay's or a worker task's: one transaction) share, to
    save round trips.

    ``claims``: the idempotency claims already stored for the batch's keys, read with one query,
    plus those the batch's own mails take as they are processed (a duplicate inside the batch
    finds its first delivery here).  ``final_states``: each mail's final inbound state, written
    with one ``UPDATE`` for all before the commit; ``ticket_counts`` likewise.  The persons the
    batch's mails name are read ahead into the transaction's person cache
    (:func:`ingest.steps.sender.read_persons`).
    """

    claims: dict[str, Claim] = field(default_factory=dict)
    final_states: list[dict[str, Any]] = field(default_factory=list)
    # Appended-to ticket id -> its message count increment (ingest.steps.store).
    ticket_counts: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Message-ID -> ticket id for the ids the batch's mails refer to, read with one query, and
    # the batch's own stored messages as they are written (ingest.steps.threading, .store).
    message_tickets: dict[str, int] = field(default_factory=dict)
    message_ids_read: set[str] = field(default_factory=set)
    # A worker batch's spooled, unprocessed mails by the Message-IDs its mails answer:
    # Message-ID -> [(inbound id, mailbox id)], read with one query (ingest.steps.threading).
    spooled_parents: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    parents_read: set[str] = field(default_factory=set)
    # The stored messages the circuit breaker's checks count, read once for the batch.
    count_window: CountWindow | None = None
    # The batch's new tickets still without a number: placeholder -> UTC day; numbered at the
    # batch's end (ingest.steps.store.number_tickets).
    unnumbered: dict[str, str] = field(default_factory=dict)
    # Tickets read ahead or created by the batch, held here because the session's identity map
    # holds unchanged objects only weakly: a reply later in the batch finds them there.
    tickets: list[Ticket] = field(default_factory=list)
    # Message rows (with their attachments) stored by the batch's mails, inserted together
    # before the final states (ingest.steps.store.write_messages).
    messages: list[PendingMessage] = field(default_factory=list)


@dataclass(slots=True)
class MailContext:
    session: Session
    settings: Settings
    mailbox: Mailbox
    inbound: InboundMail
    raw: bytes
    trace: Trace = field(default_factory=Trace)
    parsed: ParsedMail | None = None
    classification: Classification = field(default_factory=Classification)
    ticket: Ticket | None = None  # the existing ticket this mail belongs to, if any
    threaded_by: list[str] = field(default_factory=list)
    follow_up_of: int | None = None  # closed ticket whose reply starts a new ticket
    sender_email: str = ""
    sender_name: str = ""
    person: Person | None = None
    contact: Contact | None = None
    secondary_persons: list[Person] = field(default_factory=list)
    routing: Routing = field(default_factory=Routing)
    note: str | None = None  # a remark that reaches TicketInfo.Reason without ending processing
    can_defer: bool = False  # a worker may retry later (ParentPending); in-process callers not
    remarks: list[str] = field(default_factory=list)  # more of those, after ``note``
    # SPF/DKIM/DMARC evidence on the From domain, and, when the policy in force does not trust
    # the sender, why: then a subject tag alone threads nothing and no known person is named.
    authentication: SenderAuthentication = field(default_factory=SenderAuthentication)
    unverified: str | None = None
    reference: Reference | None = None  # the configured reference data; None: query instead
    # The parse step's result computed ahead, in a helper process (ingest.prepare); the parse
    # step takes it instead of parsing again.  None: parse here.
    prepared: ParsedMail | None = None
    message_row_id: int | None = None  # the stored message's id, once the store step wrote it
    batch: BatchState | None = None  # set when the mail is one of a batch

    @property
    def replayed_hold(self) -> str | None:
        """Why this mail was held, when it is being replayed out of quarantine.

        ``quarantine replay`` resets the record to ``received`` and keeps its reason; a step that
        quarantines on policy (DMARC, circuit breaker) reads the replay as the operator's release.
        """
        inbound = self.inbound
        if inbound.attempts and inbound.state == "received" and inbound.reason:
            return str(inbound.reason)
        return None

    @property
    def known_domains(self) -> Mapping[str, int] | None:
        """Company domains -> contact id from the reference data; None: look them up."""
        return self.reference.contact_domains if self.reference else None

    @property
    def mail(self) -> ParsedMail:
        if self.parsed is None:
            raise RuntimeError("step ran before parse")
        return self.parsed

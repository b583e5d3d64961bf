"""Find the existing ticket a mail belongs to, on evidence, and record which evidence matched.

Header evidence (In-Reply-To, References, our signed Message-IDs, the ids quoted in a bounce) is
trusted: a stranger cannot know them.  Subject evidence (``[#ID]`` tag, ticket number) is easy to
forge, so on its own it threads only mail from someone the ticket already knows: its person, a
secondary person, an associate, or an address of the same company; and only when the sender is
not unverified (SPF/DKIM/DMARC, see :mod:`ingest.steps.authenticate`).  Zammad threads on any
tag and RT on tag alone; osTicket's collaborator check is the model here.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, selectinload

from ingest.config import ServiceSection
from ingest.context import BatchState, MailContext, Outcome
from ingest.errors import ParentPending
from ingest.models import Associate, InboundMail, Message, Person, Ticket, utcnow
from ingest.parse import ParsedMail
from ingest.steps.sender import contact_for_domain
from ingest.tokens import tagged_ticket_ids, ticket_from_message_id, ticket_numbers

HEADER_EVIDENCE = ("in-reply-to", "references", "message-id-token", "bounced-message")
EVIDENCE_ORDER = (*HEADER_EVIDENCE, "subject-tag", "ticket-number")
MAX_REFERENCES = 50
MAX_SUBJECT_TAGS = 10  # tags looked at in one subject; a subject naming more proves nothing
# Built once (SQLAlchemy's cache key of a statement built per call cost more than running it).
_TICKETS_BY_MESSAGE_ID = select(Message.message_id, Message.ticket_id).where(
    Message.message_id.in_(bindparam("ids", expanding=True)))
# With what the steps read of each (the sender check, the Cc list, the TicketInfo): one query
# per relationship for the batch, instead of one per ticket when first read.
_TICKETS = (
    select(Ticket).where(Ticket.id.in_(bindparam("ids", expanding=True)))
    .options(selectinload(Ticket.person), selectinload(Ticket.contact),
             selectinload(Ticket.secondary_persons))
)
_TICKETS_BY_NUMBER = select(Ticket.id).where(
    Ticket.ticket_number.in_(bindparam("numbers", expanding=True)))
# A parent in the batch processed before the mail still reads "received" (so "most").
_SPOOLED_PARENT = select(InboundMail.id).where(
    InboundMail.state == "received",
    InboundMail.mailbox_id == bindparam("mailbox"),
    InboundMail.header_message_id.in_(bindparam("ids", expanding=True)),
    InboundMail.id < bindparam("before"),
).limit(bindparam("most"))
_SPOOLED_PARENTS = select(InboundMail.id, InboundMail.mailbox_id,
                          InboundMail.header_message_id).where(
    InboundMail.state == "received",
    InboundMail.header_message_id.in_(bindparam("ids", expanding=True)))


def _tickets_by_message_ids(ctx: MailContext, ids: list[str]) -> dict[str, int]:
    ids = list(dict.fromkeys(i for i in ids if i))[:MAX_REFERENCES]
    if not ids:
        return {}
    batch = ctx.batch
    if batch is not None and batch.message_ids_read.issuperset(ids):
        return {mid: batch.message_tickets[mid] for mid in ids if mid in batch.message_tickets}
    found = {mid: tid for mid, tid in ctx.session.execute(_TICKETS_BY_MESSAGE_ID, {"ids": ids})}
    if batch is not None:  # the batch's own messages are written at its end
        for mid in ids:
            if mid not in found and mid in batch.message_tickets:
                found[mid] = batch.message_tickets[mid]
    return found


def referenced_ids(mail: ParsedMail) -> list[str]:
    """The Message-IDs a mail's In-Reply-To and References name, and those a bounce quotes
    when the mail was classified ahead (:mod:`ingest.prepare`): what threading looks up."""
    bounced = mail.classification.referenced_ids if mail.classification is not None else []
    return list(dict.fromkeys(i for i in mail.in_reply_to + mail.references + bounced if i))


def read_tickets(session: Session, batch: BatchState, mails: Iterable[ParsedMail],
                 service: ServiceSection) -> None:
    """Load, with one query, the tickets a batch's mails point at (the Message-IDs read
    by :func:`read_message_tickets`, our signed Message-IDs, the subject tags), into the
    session's identity map, where the threading step's ``session.get`` finds them."""
    wanted = set(batch.message_tickets.values())
    for mail in mails:
        wanted.update(tagged_ticket_ids(mail.subject, service.subject_tag)[:MAX_SUBJECT_TAGS])
        for mid in referenced_ids(mail)[:MAX_REFERENCES]:
            ticket_id = ticket_from_message_id(mid, service.secret, service.message_id_domain)
            if ticket_id is not None:
                wanted.add(ticket_id)
    ids = sorted(wanted)
    for start in range(0, len(ids), 500):
        batch.tickets += session.scalars(_TICKETS, {"ids": ids[start:start + 500]}).all()


def read_message_tickets(session: Session, batch: BatchState, ids: Iterable[str]) -> None:
    """One query for the tickets of the Message-IDs a batch's mails refer to."""
    wanted = list(dict.fromkeys(i for i in ids if i and i not in batch.message_ids_read))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        for mid, tid in session.execute(_TICKETS_BY_MESSAGE_ID, {"ids": chunk}):
            batch.message_tickets[mid] = tid
        batch.message_ids_read.update(chunk)


def read_spooled_parents(session: Session, batch: BatchState, ids: Iterable[str]) -> None:
    """One query for the spooled, unprocessed mails that a worker batch's mails answer (see
    :func:`_wait_for_spooled_parent`).

    Run before :func:`read_message_tickets`, never after: a parent another worker finishes
    between the two reads is then seen as waiting (its reply is deferred and run again), never
    as finished while its ticket is missing from what was read (the reply would open a ticket of
    its own).  Each statement of a READ COMMITTED transaction sees what was committed when it
    began, so the second read sees every parent the first saw finished."""
    wanted = list(dict.fromkeys(i for i in ids if i and i not in batch.parents_read))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        for inbound_id, mailbox_id, mid in session.execute(_SPOOLED_PARENTS, {"ids": chunk}):
            batch.spooled_parents.setdefault(mid, []).append((inbound_id, mailbox_id))
        batch.parents_read.update(chunk)


def _header_candidates(ctx: MailContext) -> dict[str, list[int]]:
    """Evidence kind -> ticket ids, most specific first (In-Reply-To, then newest Reference)."""
    mail = ctx.mail
    service = ctx.settings.service
    bounced = ctx.classification.referenced_ids
    known = _tickets_by_message_ids(ctx, mail.in_reply_to + mail.references + bounced)
    found: dict[str, list[int]] = {}

    def add(kind: str, ticket_id: int | None) -> None:
        if ticket_id is not None and ticket_id not in found.setdefault(kind, []):
            found[kind].append(ticket_id)

    for mid in mail.in_reply_to:
        add("in-reply-to", known.get(mid))
    for mid in reversed(mail.references):
        add("references", known.get(mid))
    for mid in mail.in_reply_to + list(reversed(mail.references)) + bounced:
        add("message-id-token",
            ticket_from_message_id(mid, service.secret, service.message_id_domain))
    for mid in bounced:
        add("bounced-message", known.get(mid))
    return {k: v for k, v in found.items() if v}


def _subject_candidates(ctx: MailContext) -> dict[str, list[int]]:
    subject = ctx.mail.subject
    found: dict[str, list[int]] = {}
    tagged = list(dict.fromkeys(tagged_ticket_ids(subject, ctx.settings.service.subject_tag)))
    # Loaded whole, not just checked: the one chosen is needed next, and a ticket this
    # transaction has seen comes from the session's identity map without a query.
    existing = [t for t in tagged[:MAX_SUBJECT_TAGS] if ctx.session.get(Ticket, t) is not None]
    if existing:
        found["subject-tag"] = existing
    numbers = ticket_numbers(subject)
    if numbers:
        ids = ctx.session.scalars(_TICKETS_BY_NUMBER, {"numbers": list(numbers)}).all()
        if ids:
            found["ticket-number"] = list(ids)
    return found


def sender_knows_ticket(ctx: MailContext, ticket: Ticket) -> str | None:
    """Why the sender may thread by subject alone, or None if they may not."""
    email = ctx.sender_email
    if not email:
        return None
    if ticket.person is not None and ticket.person.email == email:
        return "sender is the ticket's person"
    if any(p.email == email for p in ticket.secondary_persons):
        return "sender is a secondary person on the ticket"
    if ctx.session.scalar(select(Associate.id).where(Associate.email == email)) is not None:
        return "sender is an associate"
    if ticket.contact_id is not None:
        person = ctx.session.scalar(select(Person).where(Person.email == email))
        contact_id = person.contact_id if person is not None else None
        if contact_id is None:
            contact = contact_for_domain(
                ctx.session, email.rpartition("@")[2],
                ctx.known_domains)
            contact_id = contact.id if contact is not None else None
        if contact_id == ticket.contact_id:
            return "sender is from the ticket's company"
    return None


def _wait_for_spooled_parent(ctx: MailContext) -> None:
    """Raise :class:`ParentPending` when a mail this one answers is spooled but unprocessed.

    Without this, a reply processed before its parent (a lost task re-enqueued by the sweep, or
    two workers racing) would open a ticket of its own.  Only workers defer, only for mails
    received earlier in the same mailbox, and only for ``worker.parent_wait_seconds``.
    """
    mail = ctx.mail
    ids = list(dict.fromkeys(mail.in_reply_to + mail.references
                             + ctx.classification.referenced_ids))[:MAX_REFERENCES]
    if not ctx.can_defer or not ids:
        return
    waited = (utcnow() - ctx.inbound.received_at).total_seconds()
    if waited > ctx.settings.worker.parent_wait_seconds:
        return
    # A parent processed earlier in the same worker batch is still "received" in the table
    # until the batch writes its final states: it counts as processed.
    finished = ({state["inbound"] for state in ctx.batch.final_states}
                if ctx.batch is not None else set())
    inbound = ctx.inbound
    if ctx.batch is not None and ctx.batch.parents_read.issuperset(ids):
        spooled = ctx.batch.spooled_parents
        parents = sorted(parent_id for mid in ids for parent_id, mailbox_id in spooled.get(mid, ())
                         if mailbox_id == inbound.mailbox_id and parent_id < inbound.id)
    else:
        parents = ctx.session.scalars(_SPOOLED_PARENT, {
            "ids": ids, "mailbox": inbound.mailbox_id, "before": inbound.id,
            "most": len(finished) + 1}).all()
    parent = next((p for p in parents if p not in finished), None)
    if parent is not None:
        ctx.trace.add("thread", f"waiting for inbound {parent}, which this mail answers")
        raise ParentPending(f"inbound {ctx.inbound.id} waits for its parent, inbound {parent}",
                            parent_id=parent)


def find_ticket(ctx: MailContext) -> Outcome | None:
    _wait_for_spooled_parent(ctx)
    headers = _header_candidates(ctx)
    subjects = _subject_candidates(ctx)
    chosen: int | None = None
    for kind in HEADER_EVIDENCE:
        if headers.get(kind):
            chosen = headers[kind][0]
            break
    if chosen is None:
        for kind in ("subject-tag", "ticket-number"):
            for candidate in subjects.get(kind, []):
                ticket = ctx.session.get(Ticket, candidate)
                if ticket is None:
                    continue
                # A subject tag is easy to forge: it counts only from an authenticated sender.
                why = None if ctx.unverified else sender_knows_ticket(ctx, ticket)
                if why:
                    chosen = candidate
                    ctx.note = None
                    ctx.trace.add("thread", f"{kind} #{candidate} accepted: {why}")
                    break
                who = ctx.sender_email or "sender"
                ctx.note = (
                    f"subject tag for ticket {candidate} not trusted: {who} is unverified"
                    if ctx.unverified else
                    f"subject tag for ticket {candidate} not trusted: {who}"
                    " is neither its person, a Cc on it, an associate, nor from its company"
                )
                ctx.trace.add("thread", ctx.note)
            if chosen is not None:
                break
    if chosen is None:
        ctx.trace.add("thread", "no existing ticket: new ticket", header_evidence=headers,
                      subject_evidence=subjects)
        return None

    ctx.threaded_by = [
        kind for kind in EVIDENCE_ORDER if chosen in headers.get(kind, subjects.get(kind, []))
    ]
    conflicting = sorted({t for ids in (*headers.values(), *subjects.values()) for t in ids}
                         - {chosen})
    ticket = ctx.session.get(Ticket, chosen)
    if ticket is None:  # pragma: no cover - ids come from the same transaction
        return None
    ctx.trace.add("thread", f"ticket {chosen} by {','.join(ctx.threaded_by)}",
                  other_candidates=conflicting)
    if (
        ticket.base_status == "closed"
        and not ctx.classification.is_automatic
        and ctx.settings.service.reopen_closed == "new"
    ):
        ctx.follow_up_of = ticket.id
        ctx.trace.add("thread", f"ticket {ticket.id} is closed: new follow-up ticket")
        ctx.threaded_by = []
        return None
    ctx.ticket = ticket
    return None

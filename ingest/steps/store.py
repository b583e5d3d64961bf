"""Write the ticket (new) or the message (appended), with its attachments.

Runs inside the same transaction as the inbound record's final state (see
:func:`ingest.pipeline.process_inbound`), so a crash leaves either everything or nothing.

New rows are written with Core ``INSERT`` statements on the session's connection, not through
the ORM's unit of work: the ORM's bookkeeping per object was the largest single cost of a
mail after parsing (about 1 ms of 5.8 on SQLite).  Only an existing ticket, loaded by the
threading step, is changed through the ORM.  In a batch (a replay's, a worker task's) the
message rows and their attachments wait for the batch's end and go in one statement each
(:func:`write_messages`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Boolean, bindparam, insert, or_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from ingest.context import BatchState, MailContext, Outcome, PendingMessage
from ingest.models import (
    Attachment,
    Message,
    Person,
    Ticket,
    TicketNumberCounter,
    TicketSecondaryPerson,
    utcnow,
)
from ingest.reference import Reference
from ingest.steps.circuit_breaker import subject_key

MAX_TITLE = 255


def next_ticket_number(ctx: MailContext, now: dt.datetime) -> str:
    """Autotask-style ``TYYYYMMDD.NNNN`` with a per-UTC-day sequence (seed 004).

    A batch's new tickets get a placeholder, and their numbers at the batch's end
    (:func:`number_tickets`).
    """
    batch = ctx.batch
    if batch is None:
        return allocate_ticket_number(ctx.session, now)
    placeholder = f"~{uuid.uuid4().hex[:24]}"  # unique, and never a TYYYYMMDD.NNNN
    batch.unnumbered[placeholder] = _utc_day(now)
    return placeholder


_TAKE_NUMBERS = (
    update(TicketNumberCounter)
    .where(TicketNumberCounter.day == bindparam("today"))
    .values(last=TicketNumberCounter.last + bindparam("count"))
    .returning(TicketNumberCounter.last)
)
_INSERT_TICKET = insert(Ticket).returning(Ticket.id)
_INSERT_MESSAGE = insert(Message).returning(Message.id)
_INSERT_MESSAGES = insert(Message).returning(Message.id, sort_by_parameter_order=True)
_INSERT_ATTACHMENT = insert(Attachment)
# Cc persons join a ticket with ON CONFLICT DO NOTHING: two workers appending mails with the same
# Cc to one ticket at once each add the person, and the later one must not fail its batch.
_ADD_SECONDARY = {
    "postgresql": postgresql_insert(TicketSecondaryPerson).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(TicketSecondaryPerson).on_conflict_do_nothing(),
}
_COUNT_MESSAGES = (
    update(Ticket).where(Ticket.id == bindparam("ticket"))
    .values(num_messages=Ticket.num_messages + bindparam("added"),
            last_changed=bindparam("now"),
            has_attachment=or_(Ticket.has_attachment, bindparam("with_attachment", type_=Boolean)))
)


def allocate_ticket_number(session: Session, now: dt.datetime) -> str:
    """The allocator behind :func:`next_ticket_number` outside a batch, also for callers without
    a MailContext (the HTTP API's SaveTicketEntity and Autotask create), so every ticket shares
    one sequence.  The counter row stays locked until the transaction ends, so numbers never
    interleave with another writer's.
    """
    day = _utc_day(now)
    return f"T{day}.{_take_numbers(session, day, 1):04d}"


def _utc_day(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y%m%d")


def _take_numbers(session: Session, day: str, count: int) -> int:
    """Take ``count`` numbers of the day's sequence; the first of them."""
    for _attempt in range(3):
        session.flush()  # the connection below bypasses the ORM: pending rows go first
        last = session.connection().execute(_TAKE_NUMBERS, {"today": day, "count": count}
                                            ).scalar()
        if last is not None:
            return int(last) - count + 1
        try:
            with session.begin_nested():
                session.execute(insert(TicketNumberCounter).values(day=day, last=count))
            return 1
        except IntegrityError:
            continue  # another worker created today's row first
    raise RuntimeError("could not allocate a ticket number")


_NUMBER_TICKET = (
    update(Ticket).where(Ticket.id == bindparam("ticket")).values(ticket_number=bindparam("number"))
)


def number_tickets(session: Session, batch: BatchState) -> dict[str, str]:
    """Give a batch's new tickets their numbers, at its end: placeholder -> number.

    Numbers come from one counter row per UTC day, locked from the moment they are taken until
    the commit (so they never interleave with another writer's and stay without gaps).  Taken
    at a batch's first new ticket, the row was held through the rest of the batch: the two
    workers' batches ran their steps one after the other, and a batch holding it while it
    waited for a row another batch had written (the same new sender's person) while that batch
    waited for the counter was a deadlock, which PostgreSQL took a second to break.  Taken
    here, the row is held only for the batch's own last writes, which wait for nobody.
    """
    if not batch.unnumbered:
        return {}
    by_day: dict[str, list[str]] = {}
    for placeholder, day in batch.unnumbered.items():
        by_day.setdefault(day, []).append(placeholder)
    numbers: dict[str, str] = {}
    for day in sorted(by_day):
        first = _take_numbers(session, day, len(by_day[day]))
        for offset, placeholder in enumerate(by_day[day]):
            numbers[placeholder] = f"T{day}.{first + offset:04d}"
    tickets = [t for t in batch.tickets if t.ticket_number in numbers]
    session.connection().execute(_NUMBER_TICKET, [
        {"ticket": t.id, "number": numbers[t.ticket_number]} for t in tickets])
    for ticket in tickets:
        set_committed_value(ticket, "ticket_number", numbers[ticket.ticket_number])
    batch.unnumbered.clear()
    return numbers


def _new_ticket(ctx: MailContext, ref: Reference, now: dt.datetime) -> Ticket:
    mail = ctx.mail
    routing = ctx.routing
    status_name = routing.status or ctx.settings.service.default_status
    status_id = ref.statuses.get(status_name)
    priority_id = ref.priorities.get(routing.priority) if routing.priority else None
    hours = ref.priority_deadline_hours.get(priority_id) if priority_id else None
    author = f"{ctx.sender_name} <{ctx.sender_email}>" if ctx.sender_name else ctx.sender_email
    row = dict(
        ticket_number=next_ticket_number(ctx, now),
        title=(mail.subject or "(no subject)")[:MAX_TITLE],
        created_at=now,
        last_changed=now,
        deadline=now + dt.timedelta(hours=hours) if hours else None,
        author=author[:400],
        owned_by_id=ref.associates.get(routing.owner) if routing.owner else None,
        category_id=ref.categories.get(routing.category) if routing.category else None,
        priority_id=priority_id,
        status_id=status_id,
        base_status=ref.status_base.get(status_id, "active") if status_id else "active",
        person_id=ctx.person.id if ctx.person else None,
        contact_id=ctx.contact.id if ctx.contact else None,
        mailbox_id=ctx.mailbox.id,
        from_address=ctx.sender_email[:320],
        tags=list(routing.tags),
        connect_id=ctx.follow_up_of,
        description=_storable(ctx, mail.text[:4000]),
        origin="Mail",
        slevel="external",
        unverified=bool(ctx.unverified),
        num_messages=1,  # this mail's message, written next
        has_attachment=bool(mail.attachments),
        num_replies=0,
        reopen_count=0,
        closed_at=None,
        replied_at=None,
        created_by_id=None,
        language=None,
    )
    ticket_id = ctx.session.connection().execute(_INSERT_TICKET, row).scalar_one()
    # The row is written; the object joins the session as if loaded, so that a reply later in
    # the same transaction (a replay batch) finds it in the identity map.
    ticket = Ticket(id=ticket_id, **row)
    make_transient_to_detached(ticket)
    ctx.session.add(ticket)
    set_committed_value(ticket, "person", ctx.person)
    set_committed_value(ticket, "contact", ctx.contact)
    if ctx.batch is not None:  # the identity map holds it weakly; the batch, for its replies
        ctx.batch.tickets.append(ticket)
        if ctx.batch.count_window is not None:  # its replies in the batch count without a query
            ctx.batch.count_window.tickets.add(ticket_id)
    return ticket


def _storable(ctx: MailContext, text: str) -> str:
    """PostgreSQL text cannot hold NUL (hostile or broken mail has it): U+FFFD there instead."""
    if "\x00" in text and ctx.session.get_bind().dialect.name == "postgresql":
        return text.replace("\x00", "\ufffd")
    return text


def _reopen_if_closed(ctx: MailContext, ticket: Ticket, ref: Reference) -> None:
    if ticket.base_status != "closed" or ctx.classification.is_automatic:
        return
    cap = ctx.settings.limits.max_reopens_per_ticket
    if cap and ticket.reopen_count >= cap:
        remark = (f"circuit breaker: ticket {ticket.id} was reopened {ticket.reopen_count} "
                  f"times (limit {cap}); appended, left closed")
        ctx.remarks.append(remark)
        ctx.trace.add("store", remark)
        return
    status_id = ref.statuses.get(ctx.settings.service.default_status)
    ticket.status_id = status_id
    ticket.base_status = "active"
    ticket.closed_at = None
    ticket.reopen_count += 1
    ctx.trace.add("store", f"ticket {ticket.id} reopened (reopen count {ticket.reopen_count})")


def _add_secondary_persons(ctx: MailContext, ticket: Ticket, new: bool) -> None:
    """Cc persons join the ticket, once each, with one INSERT; the loaded ticket's list gets
    them as stored state (through the ORM, a concurrent addition of the same person failed the
    whole transaction)."""
    present = set() if new else {p.id for p in ticket.secondary_persons}
    if ticket.person_id is not None:
        present.add(ticket.person_id)
    added: list[Person] = []
    for person in ctx.secondary_persons:
        if person.id not in present:
            added.append(person)
            present.add(person.id)
    if not added:
        return
    statement = _ADD_SECONDARY[ctx.session.get_bind().dialect.name]
    ctx.session.connection().execute(
        statement, [{"ticket_id": ticket.id, "person_id": person.id} for person in added])
    if not new:  # a new ticket's list is read from the table when first asked for
        set_committed_value(ticket, "secondary_persons", [*ticket.secondary_persons, *added])


def _count_message(ctx: MailContext, ticket: Ticket, has_attachment: bool, now: dt.datetime
                   ) -> None:
    """The appended-to ticket's counters, incremented in the database (two workers appending
    at once both count), and the loaded ticket given the same values.  In a replay batch the
    increments are summed per ticket and written with the batch (:func:`write_ticket_counts`).
    """
    if ctx.batch is None:
        ctx.session.connection().execute(_COUNT_MESSAGES, {
            "ticket": ticket.id, "added": 1, "now": now, "with_attachment": has_attachment})
    else:
        counts = ctx.batch.ticket_counts.setdefault(
            ticket.id, {"ticket": ticket.id, "added": 0, "now": now, "with_attachment": False})
        counts["added"] += 1
        counts["now"] = now
        counts["with_attachment"] = counts["with_attachment"] or has_attachment
    set_committed_value(ticket, "num_messages", (ticket.num_messages or 0) + 1)
    set_committed_value(ticket, "last_changed", now)
    if has_attachment:
        set_committed_value(ticket, "has_attachment", True)


def write_ticket_counts(session: Session, batch: BatchState) -> None:
    """A replay batch's message counts, one statement for all its appended-to tickets."""
    if batch.ticket_counts:
        session.connection().execute(_COUNT_MESSAGES, list(batch.ticket_counts.values()))
        batch.ticket_counts.clear()


def _insert_message(session: Session, message: dict[str, Any],
                    attachments: list[dict[str, Any]]) -> int:
    connection = session.connection()
    message_id: int = connection.execute(_INSERT_MESSAGE, message).scalar_one()
    if attachments:
        connection.execute(_INSERT_ATTACHMENT,
                           [{**part, "message_id": message_id} for part in attachments])
    return message_id


def write_messages(session: Session, batch: BatchState) -> None:
    """A replay batch's message rows in one ``INSERT``, their attachments in one more, before
    the batch's final states, which name the rows.

    One statement per message and one per mail's attachments were the largest part of a
    replayed mail's database time on PostgreSQL (a round trip each).  Nothing else in the batch
    needs the rows before this: threading finds the batch's own Message-IDs in the batch state,
    and the circuit breaker counts the pending rows with the stored ones.
    """
    pending = batch.messages
    if not pending:
        return
    connection = session.connection()
    ids = connection.execute(_INSERT_MESSAGES, [p.row for p in pending]).scalars().all()
    attachments = [{**part, "message_id": message_id}
                   for p, message_id in zip(pending, ids, strict=True) for part in p.attachments]
    if attachments:
        connection.execute(_INSERT_ATTACHMENT, attachments)
    final_states = {state["inbound"]: state for state in batch.final_states}
    for p, message_id in zip(pending, ids, strict=True):
        p.ctx.message_row_id = message_id
        p.trace_line["note"] += f", message {message_id}"
        inbound = p.ctx.inbound
        final_states[inbound.id]["ticket_message_id"] = message_id
        set_committed_value(inbound, "ticket_message_id", message_id)
    batch.messages.clear()


def store_ticket(ctx: MailContext, ref: Reference) -> Outcome:
    mail = ctx.mail
    now = utcnow()
    if ctx.ticket is None:
        ticket = _new_ticket(ctx, ref, now)
        action = "created"
    else:
        ticket = ctx.ticket
        action = "appended"
        _reopen_if_closed(ctx, ticket, ref)
    message = dict(
        ticket_id=ticket.id,
        inbound_id=ctx.inbound.id,
        created_at=now,
        sent_at=mail.date,
        message_id=mail.message_id,
        in_reply_to=" ".join(mail.in_reply_to) or None,
        references=mail.references[:100],
        subject=mail.subject,
        from_address=ctx.sender_email[:320],
        from_name=ctx.sender_name[:400],
        to=[[n, a] for n, a in mail.to[:200]],
        cc=[[n, a] for n, a in mail.cc[:200]],
        headers=mail.header_block,
        body_text=_storable(ctx, mail.text),
        visible_text=_storable(ctx, mail.visible_text or ""),
        body_html=mail.html,
        kind=ctx.classification.kind,
        author=(ctx.sender_name or ctx.sender_email)[:400],
        person_id=ctx.person.id if ctx.person and not ctx.classification.is_automatic else None,
        auth_verdict=ctx.authentication.verdict,
        authentication=ctx.authentication.as_dict() if ctx.authentication.evaluated else None,
        unverified=bool(ctx.unverified),
        subject_key=subject_key(mail.subject),
        arrived_at=ctx.inbound.arrived_at or ctx.inbound.received_at or now,
        slevel="external",
        language=None,
        important=False,
    )
    attachments = [
        {
            "filename": part.filename[:255],
            "content_type": part.content_type[:255],
            "size": len(part.data),
            "content_id": part.content_id,
            "inline": part.inline,
            "sha256": part.sha256,
            "origin": part.origin,
            "data": part.data,
        }
        for part in mail.attachments
    ]
    note = f"{action} ticket {ticket.id} ({ticket.ticket_number})"
    if ctx.batch is None:
        message_id = _insert_message(ctx.session, message, attachments)
        ctx.message_row_id = message_id
        note += f", message {message_id}"
    elif mail.message_id:  # later mails of the batch may answer it
        ctx.batch.message_tickets[mail.message_id] = ticket.id
        ctx.batch.message_ids_read.add(mail.message_id)
    if action == "appended":  # a new ticket was written with these already
        _count_message(ctx, ticket, has_attachment=bool(mail.attachments), now=now)
    if ctx.secondary_persons and not ctx.classification.is_automatic:
        _add_secondary_persons(ctx, ticket, new=action == "created")
    line = ctx.trace.add("store", note, attachments=[a.filename for a in mail.attachments])
    if ctx.batch is not None:
        ctx.batch.messages.append(PendingMessage(message, attachments, ctx, line))
    reason = "; ".join(n for n in (ctx.note, *ctx.remarks) if n) or None
    return Outcome(action, reason, ticket=ticket)


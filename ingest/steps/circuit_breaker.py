"""The circuit breaker on incoming rate: no ticket storm, even from mail that looks human.

``classify`` and ``automail`` stop the loops that announce themselves (RFC 3834 headers,
bounces, list mail).  This step stops the ones that do not: two autoresponders that answer each
other through the support address without ``Auto-Submitted``, a misconfigured monitoring system,
a mail server re-sending in a loop.  Limits (``[limits]``), counted over the last
``window_seconds`` before the mail's arrival, from the ``messages`` table, so every worker sees
the same numbers (a worker or replay batch reads them for all its mails at its start, see
:func:`read_window`):

* ``per_ticket_max``: mails appended to one ticket;
* ``per_sender_subject_max``: mails from one address on one subject (``Re:``/``AW:``/tags and
  ticket numbers stripped) that would open yet another ticket, the signature of a loop;
* ``per_sender_max``: mails from one address, whatever they are about: a flood ceiling.

Past a limit the mail is quarantined with the reason ``circuit breaker: ...``: kept, queryable,
and ``quarantine replay`` lets it through once the operator has looked.  Reopening is capped
separately (``max_reopens_per_ticket``, in :mod:`ingest.steps.store`).

It runs after threading and ``automail`` (it must know the ticket, and automatic mail without a
ticket is already ignored, so it is not counted twice) and before routing and the sender step,
so a held mail leaves no person or rule side effect behind.  Counts are read without locks: two
workers may each let one mail past the limit at the same instant, and a batch does not see what
other workers commit while it runs, which bounds the overshoot by the mails in flight (workers
times the batch size).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, or_, select

from ingest.context import MailContext, Outcome
from ingest.models import Message, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ingest.config import LimitsSection
    from ingest.models import InboundMail
    from ingest.parse import ParsedMail

HOLD = "circuit breaker"  # the quarantine reason's prefix; a replay of it is a release
_BRACKETS = re.compile(r"\[[^\]]{0,100}\]|\([^)]{0,100}\)")
_PREFIX = re.compile(
    r"^\s*(re|aw|antw|antwort|sv|vs|fw|fwd|wg|tr|rv|r|odp|ynt|auto|autoreply|auto-reply"
    r"|automatic reply|réf|ref)\s*(\[\d+\])?\s*[:：]\s*",
    re.I,
)
_TICKET_NUMBER = re.compile(r"\bt\d{8}\.\d{4}\b|#\d+", re.I)


def subject_key(subject: str) -> str:
    """The subject a loop keeps repeating: lower-cased, reply prefixes, bracketed tags and
    ticket numbers removed (``Re: AW: [#12] Re: Printer`` -> ``printer``), then hashed."""
    text = _BRACKETS.sub(" ", subject.lower())
    text = _TICKET_NUMBER.sub(" ", text)
    previous = None
    while previous != text:
        previous = text
        text = _PREFIX.sub("", text)
    text = " ".join(text.split())
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


# What each check counts, with its values as bound parameters: the statements are built once
# per combination of checks (a statement built per mail cost more than running it).
_CONDITIONS: dict[str, tuple[ColumnElement[bool], ...]] = {
    "ticket": (Message.ticket_id == bindparam("ticket"),),
    "sender+subject": (Message.from_address == bindparam("sender"),
                       Message.subject_key == bindparam("subject_key")),
    "sender": (Message.from_address == bindparam("sender"),),
}


@functools.lru_cache(maxsize=8)
def _count_statement(names: tuple[str, ...]) -> Select[Any]:
    """Every check's count over the window, in one query (one ``FILTER`` aggregate each)."""
    return (
        select(*(func.count().filter(and_(*_CONDITIONS[name])) for name in names))
        .select_from(Message)
        .where(Message.arrived_at >= bindparam("since"), Message.arrived_at <= bindparam("until"),
               or_(*(and_(*_CONDITIONS[name]) for name in names)))
    )


# A batch holds the counted messages only up to this many rows (a busy sender's hour can be
# thousands); past it, each mail counts with its own query.
WINDOW_MAX_ROWS = 2000
_WINDOW_ROWS = (
    select(Message.arrived_at, Message.ticket_id, Message.from_address, Message.subject_key)
    .where(Message.arrived_at >= bindparam("since"), Message.arrived_at <= bindparam("until"),
           or_(Message.from_address.in_(bindparam("senders", expanding=True)),
               Message.ticket_id.in_(bindparam("tickets", expanding=True))))
    .limit(WINDOW_MAX_ROWS + 1)
)


@dataclass(slots=True)
class CountWindow:
    """The stored messages a batch's checks count, read once for all its mails: those of
    ``senders`` and ``tickets`` that arrived between ``since`` and ``until``.  A ticket the
    batch creates joins ``tickets``: it has no stored messages yet."""

    since: dt.datetime
    until: dt.datetime
    senders: frozenset[str]
    tickets: set[int]
    by_sender: dict[str, list[tuple[dt.datetime, str | None]]] = field(default_factory=dict)
    by_ticket: dict[int, list[dt.datetime]] = field(default_factory=dict)

    def covers(self, since: dt.datetime, until: dt.datetime, values: dict[str, Any]) -> bool:
        sender, ticket = values.get("sender"), values.get("ticket")
        return (self.since <= since and until <= self.until
                and (not sender or sender in self.senders)
                and (ticket is None or ticket in self.tickets))

    def count(self, names: tuple[str, ...], since: dt.datetime, until: dt.datetime,
              values: dict[str, Any]) -> dict[str, int]:
        """What :func:`_count_statement` would count, from the rows read."""
        ticket = self.by_ticket.get(values.get("ticket", 0), ())
        sender = [subject for arrived, subject in self.by_sender.get(values.get("sender", ""), ())
                  if since <= arrived <= until]
        counts = {"ticket": sum(since <= arrived <= until for arrived in ticket),
                  "sender": len(sender),
                  "sender+subject": sender.count(values.get("subject_key"))}
        return {name: counts[name] for name in names}


def _arrival(inbound: InboundMail) -> dt.datetime:
    # The window ends when the mail arrived, not now: a backlog (an IMAP mailbox taken over,
    # spool that waited for workers) is counted as it came in, not as it is worked off.
    return inbound.arrived_at or inbound.received_at or utcnow()


def read_window(session: Session, limits: LimitsSection,
                mails: Iterable[tuple[InboundMail, ParsedMail]], tickets: Iterable[int]
                ) -> CountWindow | None:
    """Read, with one query, what the checks of a batch's mails will count: the messages of
    their possible senders (From, Reply-To, envelope sender) and of ``tickets`` (those their
    references and tags point at) in the union of their windows.  None when there is nothing
    to read or too much to hold: the mails then count one by one."""
    arrivals: list[dt.datetime] = []
    senders: set[str] = set()
    for inbound, mail in mails:
        if inbound.door not in limits.doors:
            continue
        arrivals.append(_arrival(inbound))
        senders.update(address.strip().lower() for address in (
            mail.from_address, *(address for _name, address in mail.reply_to[:1]),
            inbound.envelope_from or "") if address)
    if not arrivals:
        return None
    window = CountWindow(since=min(arrivals) - dt.timedelta(seconds=limits.window_seconds),
                         until=max(arrivals), senders=frozenset(senders),
                         tickets=set(tickets))
    rows = session.execute(_WINDOW_ROWS, {
        "since": window.since, "until": window.until, "senders": sorted(window.senders),
        "tickets": sorted(window.tickets)}).all()
    if len(rows) > WINDOW_MAX_ROWS:
        return None
    for arrived, ticket_id, sender, subject in rows:
        if sender in window.senders:
            window.by_sender.setdefault(sender, []).append((arrived, subject))
        if ticket_id in window.tickets:
            window.by_ticket.setdefault(ticket_id, []).append(arrived)
    return window


def _counts(ctx: MailContext, since: dt.datetime, until: dt.datetime,
            checks: list[tuple[str, int, str]], values: dict[str, Any]) -> dict[str, int]:
    if not checks:
        return {}
    names = tuple(name for name, _limit, _who in checks)
    window = ctx.batch.count_window if ctx.batch is not None else None
    if window is not None and window.covers(since, until, values):
        counts = window.count(names, since, until, values)
    else:
        row = ctx.session.execute(_count_statement(names),
                                  {"since": since, "until": until, **values}).one()
        counts = {name: int(value or 0) for name, value in zip(names, row, strict=True)}
    if ctx.batch is not None:  # a batch writes its messages at its end
        for pending in ctx.batch.messages:
            message = pending.row
            if since <= message["arrived_at"] <= until:
                for name in names:
                    counts[name] += _PENDING_MATCH[name](message, values)
    return counts


# The conditions of _CONDITIONS, on a message row not yet written.
_PENDING_MATCH: dict[str, Callable[[dict[str, Any], dict[str, Any]], bool]] = {
    "ticket": lambda row, values: row["ticket_id"] == values["ticket"],
    "sender+subject": lambda row, values: (row["from_address"] == values["sender"]
                                           and row["subject_key"] == values["subject_key"]),
    "sender": lambda row, values: row["from_address"] == values["sender"],
}


def circuit_breaker(ctx: MailContext) -> Outcome | None:
    limits = ctx.settings.limits
    if ctx.inbound.door not in limits.doors:
        ctx.trace.add("breaker", f"door {ctx.inbound.door} is not watched")
        return None
    held = ctx.replayed_hold
    if held is not None and held.startswith(HOLD):
        ctx.trace.add("breaker", "released from quarantine by replay")
        return None
    window = limits.window_seconds
    arrived = _arrival(ctx.inbound)
    since = arrived - dt.timedelta(seconds=window)
    sender = ctx.sender_email
    checks: list[tuple[str, int, str]] = []
    values: dict[str, Any] = {}
    if ctx.ticket is not None and limits.per_ticket_max:
        checks.append(("ticket", limits.per_ticket_max, f"ticket {ctx.ticket.id} got"))
        values["ticket"] = ctx.ticket.id
    if sender and ctx.ticket is None and limits.per_sender_subject_max:
        checks.append(("sender+subject", limits.per_sender_subject_max, f"{sender} sent"))
        values["sender"] = sender
        values["subject_key"] = subject_key(ctx.mail.subject)
    if sender and limits.per_sender_max:
        checks.append(("sender", limits.per_sender_max, f"{sender} sent"))
        values["sender"] = sender
    counts = _counts(ctx, since, arrived, checks, values)
    for name, limit, who in checks:
        seen = counts[name]
        if seen >= limit:
            about = " on this subject" if name == "sender+subject" else ""
            reason = (f"{HOLD}: {who} {seen} mails{about} in the last {window} s "
                      f"(limit {limit} per {name})")
            ctx.trace.add("breaker", reason, counts=counts)
            return Outcome("quarantined", reason[:2000])
    ctx.trace.add("breaker", "within limits", counts=counts)
    return None

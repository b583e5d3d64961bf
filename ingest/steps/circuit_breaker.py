"""The circuit breaker on incoming rate: no ticket storm, even from mail that looks human.

``classify`` and ``automail`` stop the loops that announce themselves (RFC 3834 headers,
bounces, list mail).  This step stops the ones that do not: two autoresponders that answer each
other through the support address without ``Auto-Submitted``, a misconfigured monitoring system,
a mail server re-sending in a loop.  Limits (``[limits]``), counted over the last
``window_seconds`` before the mail's arrival, from the ``messages`` table, so every worker sees
the same numbers:

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
workers may each let one mail past the limit at the same instant, which bounds the overshoot by
the number of workers.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, or_, select

from ingest.context import MailContext, Outcome
from ingest.models import Message, utcnow

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


def _counts(ctx: MailContext, since: dt.datetime, until: dt.datetime,
            checks: list[tuple[str, int, str]], values: dict[str, Any]) -> dict[str, int]:
    if not checks:
        return {}
    names = tuple(name for name, _limit, _who in checks)
    row = ctx.session.execute(_count_statement(names),
                              {"since": since, "until": until, **values}).one()
    counts = {name: int(value or 0) for name, value in zip(names, row, strict=True)}
    if ctx.batch is not None:  # a replay batch writes its messages at its end
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
    # The window ends when this mail arrived, not now: a backlog (an IMAP mailbox taken over,
    # spool that waited for workers) is counted as it came in, not as it is worked off.
    arrived = ctx.inbound.arrived_at or ctx.inbound.received_at or utcnow()
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

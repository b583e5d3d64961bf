"""Category, priority, owner and tags for a new ticket: mailbox defaults, then ``[[rule]]``s.

Rules are tried in file order; the first that matches wins unless it says ``continue = true``
(Znuny's StopAfterMatch, inverted to the safer default).  Replies keep the routing their ticket
already has, so rules apply to new tickets only.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ingest.config import Rule, RuleMatch
from ingest.context import MailContext, Outcome


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _values(ctx: MailContext, field: str) -> list[str]:
    mail = ctx.mail
    if field == "subject":
        return [mail.subject]
    if field == "from":
        return [ctx.sender_email, f"{ctx.sender_name} <{ctx.sender_email}>"]
    if field == "from_domain":
        return [ctx.sender_email.rpartition("@")[2]]
    if field == "to":
        recipients = [a for _n, a in mail.to + mail.cc] + list(ctx.inbound.envelope_to or [])
        return [a.lower() for a in recipients]
    if field == "body":
        return [mail.text]
    if field.startswith("header."):
        return mail.headers_all(field[len("header.") :])
    raise ValueError(field)


def matches(ctx: MailContext, condition: RuleMatch) -> bool:
    if condition.mailbox is not None:
        wanted = condition.mailbox if isinstance(condition.mailbox, list) else [condition.mailbox]
        if ctx.mailbox.id not in wanted:
            return False
    for field, pattern in condition.patterns():
        regex = _compiled(pattern)
        if not any(regex.search(value) for value in _values(ctx, field)):
            return False
    return True


def rule_applies(ctx: MailContext, rule: Rule) -> bool:
    if not matches(ctx, rule.match):
        return False
    return not (rule.unless is not None and matches(ctx, rule.unless))


def route(ctx: MailContext) -> Outcome | None:
    if ctx.ticket is not None:
        ctx.trace.add("route", f"reply to ticket {ctx.ticket.id}: routing unchanged")
        return None
    box = ctx.mailbox
    routing = ctx.routing
    routing.category, routing.priority, routing.owner = box.category, box.priority, box.owner
    for rule in ctx.settings.rule:
        if not rule_applies(ctx, rule):
            continue
        routing.rules.append(rule.name)
        if rule.action is not None:
            reason = f"rule {rule.name!r}: {rule.action}"
            ctx.trace.add("route", reason)
            return Outcome("ignored" if rule.action == "ignore" else "rejected", reason)
        change = rule.set
        routing.category = change.category or routing.category
        routing.priority = change.priority or routing.priority
        routing.owner = change.owner or routing.owner
        routing.status = change.status or routing.status
        routing.tags += [t for t in change.tags if t not in routing.tags]
        if not rule.continue_:
            break
    ctx.trace.add(
        "route",
        f"rules matched: {', '.join(routing.rules) or 'none'}",
        category=routing.category, priority=routing.priority, owner=routing.owner,
        tags=routing.tags,
    )
    return None

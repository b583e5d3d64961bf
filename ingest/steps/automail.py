"""Mail no human wrote may join a ticket it references, but never starts one.

This is the rule that stops ticket storms between ticketgate and an autoresponder: an
out-of-office, a bounce or a list mail without a ticket reference ends here as ``ignored``.
"""

from __future__ import annotations

from ingest.context import MailContext, Outcome


def stop_unreferenced_automatic_mail(ctx: MailContext) -> Outcome | None:
    kind = ctx.classification
    if not kind.is_automatic:
        return None
    if ctx.ticket is not None:
        ctx.trace.add("automail", f"{kind.kind} appended to ticket {ctx.ticket.id}, no reopen")
        return None
    reason = f"{kind.kind}: " + "; ".join(kind.reasons) + " (no ticket referenced)"
    ctx.trace.add("automail", reason)
    return Outcome("ignored", reason)

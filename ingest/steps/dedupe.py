"""Drop a second delivery of a mail already handled for this mailbox (design.md invariant 2)."""

from __future__ import annotations

from sqlalchemy import bindparam, select

from ingest.context import MailContext, Outcome
from ingest.models import InboundMail
from ingest.spool import dedupe_claim

# Built once: a statement built per call cost five times its execution (SQLAlchemy's cache key).
# Not the whole row: its raw bytes may be megabytes.
_FIRST_CLAIM = select(InboundMail.id, InboundMail.state, InboundMail.result).where(
    InboundMail.dedupe_claim == bindparam("claim"), InboundMail.id != bindparam("own")
)


def drop_duplicate(ctx: MailContext) -> Outcome | None:
    claim = dedupe_claim(ctx.inbound.mailbox_id, ctx.inbound.idempotency_key)
    first = ctx.session.execute(_FIRST_CLAIM, {"claim": claim, "own": ctx.inbound.id}).first()
    if first is None:
        ctx.trace.add("dedupe", f"first delivery of {ctx.inbound.idempotency_key[:80]}")
        return None
    reason = f"duplicate of inbound mail {first.id} ({first.state})"
    ctx.trace.add("dedupe", reason, first_inbound=first.id)
    result = dict(first.result or {})
    return Outcome("duplicate", reason, result=result, duplicate_of=first.id)

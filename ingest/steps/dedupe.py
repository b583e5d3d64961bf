"""Drop a second delivery of a mail already handled for this mailbox (design.md invariant 2)."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from ingest.context import Claim, MailContext, Outcome
from ingest.models import InboundMail
from ingest.spool import dedupe_claim

# Built once: a statement built per call cost five times its execution (SQLAlchemy's cache key).
# Not the whole row: its raw bytes may be megabytes.
_FIRST_CLAIM = select(InboundMail.id, InboundMail.state, InboundMail.result).where(
    InboundMail.dedupe_claim == bindparam("claim"), InboundMail.id != bindparam("own")
)
_CLAIMS = select(InboundMail.id, InboundMail.state, InboundMail.result,
                 InboundMail.dedupe_claim).where(
    InboundMail.dedupe_claim.in_(bindparam("claims", expanding=True)))


def drop_duplicate(ctx: MailContext) -> Outcome | None:
    claim = dedupe_claim(ctx.inbound.mailbox_id, ctx.inbound.idempotency_key)
    if ctx.batch is not None:  # read for the whole batch already
        first = ctx.batch.claims.get(claim)
    else:
        row = ctx.session.execute(_FIRST_CLAIM, {"claim": claim, "own": ctx.inbound.id}).first()
        first = Claim(row.id, row.state, row.result) if row is not None else None
    if first is None or first.inbound_id == ctx.inbound.id:
        ctx.trace.add("dedupe", f"first delivery of {ctx.inbound.idempotency_key[:80]}")
        return None
    reason = f"duplicate of inbound mail {first.inbound_id} ({first.state})"
    ctx.trace.add("dedupe", reason, first_inbound=first.inbound_id)
    result = dict(first.result or {})
    return Outcome("duplicate", reason, result=result, duplicate_of=first.inbound_id)


def read_claims(session: Session, claims: list[str]) -> dict[str, Claim]:
    """The stored claims among ``claims``, in one query (a replay batch's dedupe)."""
    if not claims:
        return {}
    rows = session.execute(_CLAIMS, {"claims": claims}).all()
    return {row.dedupe_claim: Claim(row.id, row.state, row.result) for row in rows}

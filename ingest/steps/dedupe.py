"""Drop a second delivery of a mail already handled for this mailbox (design.md invariant 2)."""

from __future__ import annotations

import hashlib

from sqlalchemy import bindparam, select, text
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


# Transaction-scoped advisory locks, one per claim, taken in the order of the array (unnest
# returns its elements in order): sorted, so two batches never wait on each other in a circle.
_LOCK_CLAIMS = text("SELECT pg_advisory_xact_lock(key) FROM unnest(CAST(:keys AS bigint[])) AS key")


def _claim_lock_key(claim: str) -> int:
    return int.from_bytes(hashlib.sha256(claim.encode("utf-8", "replace")).digest()[:8], "big",
                          signed=True)


def lock_claims(session: Session, claims: list[str]) -> None:
    """Wait for every other transaction that may be taking one of ``claims`` (PostgreSQL).

    Two deliveries of one mail in two workers' batches at the same moment: each batch read the
    claims before the other had written its own, so both processed the mail as new, and the
    second's final write hit the unique claim and rolled back its whole batch (every other mail
    then redone one by one).  A worker batch takes a lock per claim before reading them, and a
    mail processed on its own takes its claim's, each held to the commit: the second waits for
    the first (only when they share a mail), then reads the first delivery's claim and records a
    duplicate like any other.  Nothing to do on SQLite, whose one write lock already makes
    writers wait for each other."""
    if claims and session.get_bind().dialect.name == "postgresql":
        session.execute(_LOCK_CLAIMS, {"keys": sorted({_claim_lock_key(c) for c in claims})})


def read_claims(session: Session, claims: list[str]) -> dict[str, Claim]:
    """The stored claims among ``claims``, in one query (a replay batch's dedupe)."""
    if not claims:
        return {}
    rows = session.execute(_CLAIMS, {"claims": claims}).all()
    return {row.dedupe_claim: Claim(row.id, row.state, row.result) for row in rows}

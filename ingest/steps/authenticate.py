"""Who really sent this mail: SPF, DKIM and DMARC on the From domain (``ingest.authentication``).

Where the evidence comes from:

* mail our SMTP listener took from an internet client: our own SPF, DKIM and DMARC checks;
* everything else (IMAP, HTTP, replay, SMTP from a ``trusted_relays`` address): the topmost
  Authentication-Results field of a trusted authserv-id, if there is one; otherwise none.

What the policy in force (``[authentication]``, per-mailbox overrides) does with it, when
``enforce`` is on:

* DMARC fails and the domain publishes ``p=quarantine`` or ``p=reject``: the mail is quarantined
  with the reason ``DMARC policy ...`` (kept, never dropped; ``quarantine replay`` releases it,
  and it is then processed as from an unverified sender);
* the sender did not pass (or there was no evidence and ``unauthenticated = "unverified"``):
  ``ctx.unverified`` says why; threading then ignores subject tags, the sender step attributes
  the mail to no known person, and a new ticket is flagged unverified.
"""

from __future__ import annotations

from email.message import Message

from ingest.authentication import (
    SenderAuthentication,
    authenticate_from_header,
    authenticate_smtp,
    in_networks,
    lookup_for,
    trusted_results,
)
from ingest.config import AuthenticationSection, Mailbox, Settings
from ingest.context import MailContext, Outcome
from ingest.models import InboundMail

DMARC_HOLD = "DMARC policy"  # the quarantine reason's prefix; a replay of it is a release


def checked_here(section: AuthenticationSection, inbound: InboundMail) -> bool:
    """Whether ticketgate checks SPF, DKIM and DMARC itself, with DNS look-ups: mail its SMTP
    listener took from a client outside ``trusted_relays``."""
    return bool(inbound.door == "smtp" and inbound.client_ip and section.check_smtp
                and not in_networks(inbound.client_ip, section.trusted_relays))


def sender_evidence(settings: Settings, mailbox: Mailbox, inbound: InboundMail, raw: bytes,
                    message: Message) -> SenderAuthentication:
    """The evidence on the From domain for this delivery, with the DNS lookups it takes.

    It needs no database, so the pipeline works it out before a mail's transaction
    (:func:`ingest.prepare.prepare_delivery`): a slow name server then holds up only this mail,
    not SQLite's one write lock (which the listener's spool writes wait for) or PostgreSQL rows
    and a pooled connection."""
    section = settings.authentication
    if checked_here(section, inbound):
        return authenticate_smtp(lookup_for(section), raw, message, inbound.client_ip,
                                 inbound.helo, inbound.envelope_from,
                                 section.max_dkim_signatures)
    trusted_ids = section.policy_for(mailbox).trusted_authserv_ids
    header = trusted_results(message, trusted_ids)
    if header is not None:
        return authenticate_from_header(lookup_for(section), message, header, inbound.sha256)
    if inbound.door == "smtp" and inbound.client_ip and section.check_smtp:
        why = f"trusted relay {inbound.client_ip} added no trusted Authentication-Results"
    elif trusted_ids:
        why = f"no Authentication-Results from {', '.join(trusted_ids)}"
    else:
        why = f"door {inbound.door}: no trusted authserv-id configured"
    return SenderAuthentication(reason=f"no evidence ({why})")


def _idna(domain: str) -> str:
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def authenticate(ctx: MailContext) -> Outcome | None:
    policy = ctx.settings.authentication.policy_for(ctx.mailbox)
    auth = ctx.mail.authentication  # worked out ahead of the transaction, or None
    if auth is None:
        auth = sender_evidence(ctx.settings, ctx.mailbox, ctx.inbound, ctx.raw, ctx.mail.message)
    ctx.authentication = auth
    ctx.trace.add("authenticate", f"{auth.source}: {auth.verdict}: {auth.reason}",
                  results=auth.summary(), authserv_id=auth.authserv_id,
                  enforced=policy.enforce)
    if not policy.enforce:
        return None
    if auth.dmarc is not None and auth.dmarc.result == "fail" and auth.policy in (
        "quarantine", "reject"
    ):
        held = ctx.replayed_hold
        if held is None or not held.startswith(DMARC_HOLD):
            reason = f"{DMARC_HOLD} {auth.policy}: {auth.reason}; {auth.summary()}"
            ctx.trace.add("authenticate", reason)
            return Outcome("quarantined", reason[:2000])
        ctx.trace.add("authenticate", "released from quarantine by replay; sender unverified")
    if not auth.evaluated:
        if policy.unauthenticated == "unverified":
            ctx.unverified = auth.reason
    elif auth.verdict != "pass":
        ctx.unverified = f"{auth.summary() or auth.verdict}: {auth.reason}"
    elif _idna(ctx.sender_email.rpartition("@")[2]) != auth.from_domain:
        ctx.unverified = (f"{ctx.sender_email or 'the sender'} is not in the authenticated "
                          f"From domain {auth.from_domain}")
    if ctx.unverified:
        ctx.remarks.append(f"unverified sender: {ctx.unverified}"[:500])
        ctx.trace.add("authenticate", f"unverified sender: {ctx.unverified}")
    return None

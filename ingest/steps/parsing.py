"""Parse the raw bytes and decide which address speaks for the customer."""

from __future__ import annotations

from ingest.context import MailContext, Outcome
from ingest.parse import MailLimitExceeded, ParsedMail, parse_mail

# Header fields a relay adds on the way; a mail with only these carries nothing of its sender.
TRACE_FIELDS = frozenset({"received", "return-path", "delivered-to", "x-original-to"})


def is_empty(mail: ParsedMail) -> bool:
    """No header of the sender's (only trace fields) and no body: an empty SMTP DATA, say.
    RFC 5322 requires From and Date; such a mail gives an agent nothing to answer."""
    names = {name.lower() for name in mail.message}  # the field names
    return (names <= TRACE_FIELDS and not mail.text.strip() and not mail.html.strip()
            and not mail.attachments)


def parse(ctx: MailContext) -> Outcome | None:
    if ctx.prepared is not None:  # parsed ahead (ingest.prepare: a replay helper, a worker batch)
        mail = ctx.prepared
    else:
        try:
            mail = parse_mail(ctx.raw)
        except MailLimitExceeded as exc:  # hostile input: a clear, permanent answer
            reason = f"over a parser limit: {exc}"
            ctx.trace.add("parse", reason)
            return Outcome("rejected", reason)
    ctx.parsed = mail
    if is_empty(mail):
        reason = "empty message: no header besides trace fields and no body"
        ctx.trace.add("parse", reason)
        return Outcome("ignored", reason)
    name, address = mail.from_name, mail.from_address
    if ctx.settings.service.sender_address == "reply-to" and mail.reply_to:
        name, address = mail.reply_to[0]
    # MAIL FROM, where the mail came over SMTP; records spooled before the listener stored the
    # null sender as "" hold "<>".
    envelope_from = (ctx.inbound.envelope_from or "").strip().removeprefix("<").removesuffix(">")
    if not address and envelope_from:
        address = envelope_from
    ctx.sender_email = address.strip().lower()
    ctx.sender_name = name.strip()
    ctx.trace.add(
        "parse",
        f"from {ctx.sender_email or '(none)'}; {len(mail.attachments)} attachment(s)",
        subject=mail.subject[:200],
        message_id=mail.message_id,
        defects=len(mail.defects),
        **({"helper": True} if mail.by_helper else {}),
    )
    return None

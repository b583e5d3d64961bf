"""Recognise mail no human wrote: loops, auto-replies, bounces and bulk mail.

The header rules are the union of what Zammad, Request Tracker, Znuny, osTicket and FreeScout
check (see shared/anchors.md), with RFC 3834 (Auto-Submitted) and RFC 3464 (delivery status
reports) as the primary signals.  A mail that is classified here can still be appended to a ticket
it references, but it never opens one and never reopens one (see :mod:`ingest.steps.automail`).
"""

from __future__ import annotations

import re
from email.message import Message

from ingest.context import Classification, MailContext, Outcome
from ingest.parse import ParsedMail, _ids, decode_header_value, normalize_message_id

LOOP_MARKER = "ticketgate"

_BOUNCE_SENDER = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"^(undeliver(ed|able)|delivery (status notification|failure|has failed|notification)"
    r"|mail delivery (failed|failure|subsystem|system)|returned mail|failure notice"
    r"|non[- ]?deliver|delivery report|message not delivered|warning: could not send"
    r"|unzustellbar|nicht zustellbar|undelivered mail returned)",
    re.I,
)
_AUTOREPLY_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort|svar)|out of (the )?office|ooo\b"
    r"|abwesenheitsnotiz|r[ée]ponse automatique|automatische antwort|autosvar"
    r"|respuesta autom[aá]tica|risposta automatica|vacation|on leave|away from)",
    re.I,
)
_BULK_PRECEDENCE = {"bulk", "junk", "list"}


def _auto_reply_reasons(msg: Message, mail: ParsedMail) -> list[str]:
    reasons = []
    auto_submitted = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto_submitted and auto_submitted != "no":
        reasons.append(f"Auto-Submitted: {auto_submitted[:40]}")
    for header in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Reply"):
        if msg.get(header) is not None:
            reasons.append(f"{header} present")
    suppress = str(msg.get("X-Auto-Response-Suppress", "")).strip().lower()
    if suppress and any(v in suppress for v in ("all", "oof", "autoreply")):
        reasons.append(f"X-Auto-Response-Suppress: {suppress[:40]}")
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        reasons.append("Precedence: auto_reply")
    if msg.get("X-MS-Exchange-Inbox-Rules-Loop") or msg.get("X-MS-Exchange-Generated-Message-Source"):
        reasons.append("Exchange generated message")
    if _AUTOREPLY_SUBJECT.match(_strip_reply_prefix(mail.subject)):
        reasons.append(f"subject {mail.subject[:60]!r}")
    if msg.get_content_type() == "multipart/report" and (
        msg.get_param("report-type") == "disposition-notification"
    ):
        reasons.append("read receipt (disposition-notification)")
    return reasons


def _strip_reply_prefix(subject: str) -> str:
    return re.sub(r"^((re|aw|fw|fwd|sv|wg)\s*:\s*)+", "", subject.strip(), flags=re.I)


def _null_return_path(msg: Message) -> bool:
    return any(str(v).strip() in ("<>", "") for v in msg.get_all("Return-Path", []))


def _bounce_reasons(msg: Message, mail: ParsedMail) -> list[str]:
    reasons = []
    ctype = msg.get_content_type()
    report_type = str(msg.get_param("report-type") or "").lower()
    if ctype == "multipart/report" and report_type in ("delivery-status", "feedback-report"):
        reasons.append(f"multipart/report; report-type={report_type}")
    if msg.get("X-Failed-Recipients"):
        reasons.append("X-Failed-Recipients present")
    from_bounce_address = bool(_BOUNCE_SENDER.match(mail.from_address))
    bounce_subject = bool(_BOUNCE_SUBJECT.match(_strip_reply_prefix(mail.subject)))
    if from_bounce_address and (bounce_subject or _null_return_path(msg) or not reasons):
        reasons.append(f"sent by {mail.from_address}")
    elif bounce_subject and _null_return_path(msg):
        reasons.append("bounce subject with null Return-Path")
    return reasons


def _bulk_reasons(msg: Message) -> list[str]:
    reasons = []
    precedence = str(msg.get("Precedence", "")).strip().lower()
    if precedence in _BULK_PRECEDENCE:
        reasons.append(f"Precedence: {precedence}")
    for header in ("List-Id", "List-Unsubscribe", "List-Post", "Feedback-ID"):
        if msg.get(header) is not None:
            reasons.append(f"{header} present")
    return reasons


def _bounced_message_ids(msg: Message) -> tuple[list[str], str]:
    """Message-IDs and subject of the original mail quoted inside a bounce."""
    ids: list[str] = []
    subject = ""
    for part in msg.walk():
        ctype = part.get_content_type()
        headers: Message | None = None
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                headers = payload[0]
        elif ctype == "text/rfc822-headers":
            from email.parser import HeaderParser

            text = part.get_payload(decode=True) or b""
            headers = HeaderParser().parsestr(text.decode("utf-8", "replace"))
        if headers is None:
            continue
        own = normalize_message_id(headers.get("Message-ID"))
        if own:
            ids.append(own)
        ids += _ids(str(headers.get("In-Reply-To", "") or ""))
        ids += _ids(" ".join(str(v) for v in headers.get_all("References", [])))
        subject = subject or decode_header_value(headers.get("Subject", ""))
    return ids, subject


def classify(ctx: MailContext) -> Outcome | None:
    mail = ctx.mail
    msg = mail.message
    own = ctx.settings.own_addresses
    if mail.from_address and mail.from_address in own:
        reason = f"loop: sent from our own address {mail.from_address}"
        ctx.trace.add("classify", reason)
        return Outcome("ignored", reason)
    loop_headers = " ".join(str(v) for v in msg.get_all("X-Loop", []))
    if LOOP_MARKER in loop_headers.lower():
        reason = "loop: X-Loop carries our marker"
        ctx.trace.add("classify", reason)
        return Outcome("ignored", reason)

    result = Classification()
    if reasons := _bounce_reasons(msg, mail):
        result.kind = "bounce"
        result.reasons = reasons
        result.referenced_ids, quoted_subject = _bounced_message_ids(msg)
        if quoted_subject:
            result.reasons.append(f"quoted subject {quoted_subject[:60]!r}")
    elif reasons := _auto_reply_reasons(msg, mail):
        result.kind, result.reasons = "auto-reply", reasons
    elif reasons := _bulk_reasons(msg):
        result.kind, result.reasons = "bulk", reasons
    elif _null_return_path(msg) and not mail.from_address:
        result.kind, result.reasons = "auto-reply", ["null Return-Path and no From"]
    ctx.classification = result
    ctx.trace.add("classify", result.kind, evidence=result.reasons)
    return None

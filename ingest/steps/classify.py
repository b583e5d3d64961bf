"""Recognise mail no human wrote: loops, auto-replies, bounces and bulk mail.

The header rules are the union of what Zammad, Request Tracker, Znuny, osTicket and FreeScout
check (see shared/anchors.md), with RFC 3834 (Auto-Submitted) and RFC 3464 (delivery status
reports) as the primary signals.  A mail that is classified here can still be appended to a ticket
it references, but it never opens one and never reopens one (see :mod:`ingest.steps.automail`).
"""

from __future__ import annotations

import re
from email.message import Message
from email.utils import getaddresses, parseaddr

from ingest.classification import Classification
from ingest.context import MailContext, Outcome
from ingest.message_ids import message_ids_in as _ids
from ingest.message_ids import normalize_message_id
from ingest.parse import ParsedMail, decode_header_value

LOOP_MARKER = "ticketgate"

# Who sends bounces: the MTA's own mailbox (RFC 5321 4.5.1 postmaster, the sendmail-era
# MAILER-DAEMON, spelled many ways), with or without a domain ("From: mailer-daemon",
# "From: MAILER-DAEMON <>"), or under the display names MTAs give it.  RT's rule is the local part.
_BOUNCE_LOCAL_PART = re.compile(r"^(mailer[-_.]?daemon|mail[-_.]?daemon|post[-_.]?master)$", re.I)
_BOUNCE_DISPLAY_NAME = re.compile(
    r"^(mail(er)?[ -]?delivery[ -]?(sub)?system|mail[ -]?delivery[ -]?service|mailer[- ]?daemon"
    r"|post[ -]?master|mail administrator|returned mail)$",
    re.I,
)
_BOUNCE_SUBJECT = re.compile(
    r"^(undeliver(ed|able)|delivery (status|failure|has failed|notification|report|problem)"
    r"|mail delivery (failed|failure|subsystem|system|problem)|returned mail|failure notice"
    r"|non[- ]?deliver|delivery report|message not delivered|warning: could not send"
    r"|(mail|message) (could not|couldn't|was not|cannot) be delivered|failed delivery"
    r"|there was an error sending your mail|mail system error|delayed mail"
    r"|unzustellbar|nicht zustellbar|undelivered mail returned)",
    re.I,
)
# RFC 3464 / RFC 6533 delivery reports and RFC 5965 (ARF) complaints, wherever they are nested:
# some MTAs put them in multipart/mixed, some send the report part alone.
_REPORT_PARTS = frozenset(
    {"message/delivery-status", "message/global-delivery-status", "message/feedback-report"}
)
# The returned original (or its header), which a bounce carries and a person rarely attaches.
_RETURNED_PARTS = frozenset(
    {"message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers"}
)
_AUTOREPLY_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort|svar)|out of (the )?office|ooo\b"
    r"|abwesenheitsnotiz|r[ée]ponse automatique|automatische antwort|autosvar"
    r"|respuesta autom[aá]tica|risposta automatica|vacation|on leave|away from)",
    re.I,
)
_BULK_PRECEDENCE = {"bulk", "junk", "list"}
_BULK_HEADERS = (
    "List-Id", "List-Unsubscribe", "List-Post", "List-Subscribe", "List-Help", "List-Owner",
    "List-Archive", "Mailing-List", "X-Mailing-List", "Feedback-ID",
)
# Amazon SES event notifications delivered by mail (through SNS): a JSON document whose
# notificationType says Bounce, Complaint or Delivery (sisimai reads them the same way).
_SES_NOTIFICATION = re.compile(r'notificationType\\?"\s*:\s*\\?"(Bounce|Complaint|Delivery)\\?"')
_SES_SENDER = re.compile(r"(@sns\.amazonaws\.com|amazonses\.com)$", re.I)


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
    if msg.get("X-MS-Exchange-Inbox-Rules-Loop") or msg.get(
        "X-MS-Exchange-Generated-Message-Source"
    ):
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


def _envelope_sender(msg: Message) -> str | None:
    """The topmost Return-Path: the one final delivery added (the SMTP listener's own, or the
    delivering MTA's for mail fetched over IMAP).  Any below it came from earlier hops or from
    the sender, and do not say who the envelope sender was."""
    value = msg.get("Return-Path")
    return None if value is None else str(value).strip()


def _null_return_path(msg: Message) -> bool:
    return _envelope_sender(msg) in ("<>", "")


def _is_bounce_mailbox(name: str, address: str) -> bool:
    local = address.strip().strip("<>").rpartition("@")[0] or address.strip().strip("<>")
    return bool(_BOUNCE_LOCAL_PART.match(local) or _BOUNCE_DISPLAY_NAME.match(name.strip()))


def _bounce_sender(msg: Message, mail: ParsedMail) -> str | None:
    """The From header names the MTA itself (read raw: the parsed address is often empty)."""
    if _is_bounce_mailbox(mail.from_name, mail.from_address):
        return mail.from_address or mail.from_name
    for value in msg.get_all("From", []):
        text = decode_header_value(value)
        for name, address in getaddresses([text]):
            if _is_bounce_mailbox(name, address or text):
                return address or name or text.strip()
    return None


def _bounce_return_path(msg: Message) -> bool:
    """An envelope sender of MAILER-DAEMON@host: some MTAs use it instead of the null sender."""
    _name, address = parseaddr(_envelope_sender(msg) or "")
    return bool(address) and _is_bounce_mailbox("", address)


def _part_types(msg: Message) -> set[str]:
    types: set[str] = set()
    for part in msg.walk():
        types.add(part.get_content_type())
        if len(types) > 200:  # hostile nesting: enough to decide
            break
    return types


def _bounce_reasons(msg: Message, mail: ParsedMail) -> list[str]:
    """Evidence that this is a delivery report, modelled on what RT, Zammad and sisimai check.

    Conclusive on its own: an RFC 3464/6533 delivery-status or RFC 5965 feedback-report part
    (in a multipart/report or not), ``X-Failed-Recipients`` (Exim), or a From naming the MTA's
    own mailbox (RT's rule).  A bounce-like subject, or a returned original mail, counts only
    when the message is also machine-sent: null or MAILER-DAEMON envelope sender, Auto-Submitted.
    """
    reasons = []
    ctype = msg.get_content_type()
    report_type = str(msg.get_param("report-type") or "").lower()
    types = _part_types(msg)
    if ctype == "multipart/report" and report_type in ("delivery-status", "feedback-report"):
        reasons.append(f"multipart/report; report-type={report_type}")
    elif found := sorted(types & _REPORT_PARTS):
        reasons.append(f"{found[0]} part")
    if msg.get("X-Failed-Recipients"):
        reasons.append("X-Failed-Recipients present")
    if sender := _bounce_sender(msg, mail):
        reasons.append(f"sent by {sender[:80]}")
    if reasons:
        return reasons
    if _SES_SENDER.search(mail.from_address) and (
        found_ses := _SES_NOTIFICATION.search(mail.text[:20_000])
    ):
        return [f"Amazon SES {found_ses.group(1)} notification"]
    machine_sent = []
    if _null_return_path(msg):
        machine_sent.append("null Return-Path")
    elif _bounce_return_path(msg):
        machine_sent.append("Return-Path is MAILER-DAEMON")
    auto_submitted = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto_submitted and auto_submitted != "no":
        machine_sent.append(f"Auto-Submitted: {auto_submitted[:40]}")
    if not machine_sent:
        return []
    if _BOUNCE_SUBJECT.match(mail.subject.strip()):
        return [f"bounce subject {mail.subject[:60]!r}", *machine_sent]
    if ctype == "multipart/report" and report_type != "disposition-notification":
        return [f"multipart/report; report-type={report_type or '(none)'}", *machine_sent]
    if returned := sorted(types & _RETURNED_PARTS):
        return [f"returned {returned[0]} part", *machine_sent]
    return []


def _bulk_reasons(msg: Message) -> list[str]:
    """List and campaign mail: Precedence, the RFC 2919/2369 list headers, the older list
    managers' own (ezmlm ``Mailing-List``, SmartList/vger ``X-Mailing-List``), ESP Feedback-ID."""
    reasons = []
    precedence = str(msg.get("Precedence", "")).strip().lower()
    if precedence in _BULK_PRECEDENCE:
        reasons.append(f"Precedence: {precedence}")
    for header in _BULK_HEADERS:
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
        payload = part.get_payload()
        if ctype.startswith("message/") and isinstance(payload, list) and payload:
            headers = payload[0]  # message/rfc822, message/global, message/rfc822-headers
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
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

    if mail.classification is None:  # a replay helper may have done it already
        mail.classification = classify_mail(mail)
    ctx.classification = result = mail.classification
    ctx.trace.add("classify", result.kind, evidence=result.reasons)
    return None


def classify_mail(mail: ParsedMail) -> Classification:
    """The mail's kind from its headers and structure alone, no settings: so a replay helper
    can work it out ahead of the pipeline (:mod:`ingest.prepare`)."""
    msg = mail.message
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
    return result

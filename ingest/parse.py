"""Parsing: raw RFC822 bytes into a :class:`ParsedMail` the pipeline steps can read.

mail-parser does the MIME walk, RFC 2047/2231 header decoding and defect collection.  Two of its
behaviours are not good enough for a help desk, so they are replaced here:

* body text decoding trusts the declared charset or falls back to UTF-8 with replacement
  characters; a latin-1 mail without a charset, or an ISO-2022-JP body sent as 7bit, then reads as
  garbage.  :func:`decode_text` guesses instead (see its docstring);
* attachments without a file name get random names, which breaks idempotent replays; ours are
  derived from the part (Content-ID, subject of a forwarded mail, MIME type).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
import datetime as dt
import email.header
import hashlib
import logging
import mimetypes
import re
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from typing import TYPE_CHECKING, Any

import charset_normalizer
import mailparser
import nh3
from inscriptis import get_text

from ingest import tnef
from ingest.classification import Classification
from ingest.errors import ParseError
from ingest.message_ids import message_ids_in as _ids
from ingest.message_ids import normalize_message_id

if TYPE_CHECKING:
    from ingest.authentication import SenderAuthentication

# mail-parser warns once per MIME part it leaves to us (delivery reports, returned headers):
# every bounce would log a warning about nothing that is wrong.
logging.getLogger("mailparser").setLevel(logging.ERROR)

_ADDRESS_RE = re.compile(r"[^@\s<>\"',;]+@[^@\s<>\"',;]+")
_JIS_ESCAPE = b"\x1b$B"
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
# Parts kept as one attachment, their inner structure not walked: an attached mail (RFC 2046
# 5.2.1, RFC 6532 message/global) belongs to its sender, not to this mail's body or files; the
# body of a message/external-body (RFC 2046 5.2.3) is only the header of content stored elsewhere,
# so its inner "part" is a reference, not a file, and the name is the one on the outer part.
_WHOLE_PARTS = frozenset(
    {"message/rfc822", "message/global", "message/external-body", "text/rfc822-headers"}
)
_EPILOGUE_DEFECTS = frozenset({"StartBoundaryNotFoundDefect"})  # mailparser.const.EPILOGUE_DEFECTS
# Control characters, path separators, characters Windows refuses, and the Unicode bidi
# controls that make "invoice\u202efdp.exe" display as "invoiceexe.pdf".
_UNSAFE_FILENAME = re.compile(
    r"[\x00-\x1f\x7f-\x9f/\\:*?\"<>|\u200e\u200f\u202a-\u202e\u2066-\u2069]+")
# What must never reach a one-line stored field (subject, names, addresses, ids): a CR or LF
# there is a header injection waiting for whoever writes it into a mail; NUL breaks PostgreSQL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u2028\u2029]")
# Hostile-input limits (design.md invariant 5): past one, the mail is rejected with the reason.
MAX_HEADER_BYTES = 1024 * 1024  # the top-level header block
MAX_HEADER_FIELDS = 2000  # top-level header fields
MAX_MIME_PARTS = 1000  # parts of any kind, nested mails included
MAX_MIME_DEPTH = 50  # multipart and message/* nesting
MAX_ATTACHMENTS = 500
MAX_ATTACHMENT_BYTES = 100 * 1024 * 1024  # decoded, all attachments together (TNEF unpacked)
MAX_FILENAME = 180
MIN_GUESS_BYTES = 16  # non-ASCII bytes a header needs before a statistical charset guess


@dataclass(slots=True)
class ParsedAttachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False
    origin: str = "mime"  # mime | tnef

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(slots=True)
class ParsedMail:
    """What the pipeline knows about one mail after parsing; nothing here touches the database."""

    message: EmailMessage
    subject: str
    message_id: str | None
    in_reply_to: list[str]
    references: list[str]
    from_name: str
    from_address: str
    reply_to: list[tuple[str, str]]
    sender: list[tuple[str, str]]
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    date: dt.datetime | None
    text: str
    html: str
    attachments: list[ParsedAttachment] = field(default_factory=list)
    # The new part of a reply, without quoted history and signature; None until the pipeline
    # (or a replay helper, ingest.prepare) has extracted it.
    visible_text: str | None = None
    # What kind of mail it is, from the mail alone; None until the classify step (or a replay
    # helper) has looked.
    classification: Classification | None = None
    # The evidence on the From domain for the delivery being processed (its envelope, DNS),
    # when worked out ahead of the mail's transaction (ingest.prepare.prepare_delivery).
    authentication: SenderAuthentication | None = None
    by_helper: bool = False  # parsed in a replay helper process (the trace says so)
    defects: list[str] = field(default_factory=list)
    header_block: str = ""
    header_charset: str | None = None  # the hint for raw 8-bit header bytes, see header_charset()

    def header(self, name: str) -> str:
        """The first value of a header, decoded; empty string when absent."""
        value = self.message.get(name)
        return decode_header_value(value, self.header_charset) if value is not None else ""

    def headers_all(self, name: str) -> list[str]:
        return [decode_header_value(v, self.header_charset)
                for v in self.message.get_all(name, [])]


def header_charset(message: EmailMessage) -> str | None:
    """The charset a mailer most likely used for raw 8-bit bytes in this mail's headers.

    Mailers that put raw 8-bit text in headers write it in the charset they declare for the
    body, so the first declared charset of the mail is the hint (``us-ascii`` is no hint).
    """
    try:
        charsets = message.get_charsets()
    except Exception:
        return None
    for charset in charsets:
        if charset and charset.lower() not in ("us-ascii", "ascii"):
            try:
                codecs.lookup(charset)
            except LookupError:
                continue
            return str(charset)
    return None


def _decode_8bit_header(raw: bytes, hint: str | None) -> str:
    """Raw 8-bit header bytes as text: UTF-8 (legal since RFC 6532), else the mail's declared
    charset, else a statistical guess when there is enough text for one, else Windows-1252.

    Headers are short, so charset-normalizer alone guesses poorly on them (one ``0xF6`` in a
    subject is as likely an em dash as an umlaut to it); the body's declared charset is the
    better evidence.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if hint:
        try:
            return raw.decode(hint)
        except (LookupError, UnicodeDecodeError):
            pass
    if sum(byte >= 0x80 for byte in raw) >= MIN_GUESS_BYTES:
        return decode_text(raw, None)
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _header_source(value: Any, hint: str | None = None) -> str:
    """The header value as text before RFC 2047 decoding, with raw 8-bit bytes decoded.

    With the compat32 policy the stdlib keeps raw 8-bit header bytes as surrogate escapes and
    hands them out wrapped in an ``unknown-8bit`` :class:`email.header.Header`, whose ``str()``
    turns every such byte into U+FFFD.  Mailers send raw 8-bit headers all the time: UTF-8 (now
    legal, RFC 6532) or a legacy charset, even inside an encoded-word (``=?iso-8859-1?Q?Fr\xf6?=``).
    So the bytes are recovered and decoded: UTF-8 when they are valid UTF-8; otherwise, when
    encoded-words are present, latin-1, which maps each byte to the code point of the same
    value so that :func:`email.header.decode_header` hands the bytes on to the encoded-word's
    declared charset; otherwise as :func:`_decode_8bit_header` says.
    """
    if isinstance(value, email.header.Header):
        raw = b"".join(
            chunk if isinstance(chunk, bytes) else chunk.encode("utf-8", "surrogateescape")
            for chunk, _charset in email.header.decode_header(value)
        )
    else:
        text = str(value)
        if not _SURROGATE_RE.search(text):
            return text
        raw = text.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if b"=?" in raw:
        return raw.decode("latin-1")
    return _decode_8bit_header(raw, hint)


def decode_header_value(value: Any, charset_hint: str | None = None) -> str:
    """RFC 2047 decode one raw header value (raw 8-bit bytes included), never raising.

    ``charset_hint`` is the charset to try for raw 8-bit bytes (see :func:`header_charset`).
    """
    source = _header_source(value, charset_hint)
    try:
        chunks = email.header.decode_header(source)
    except Exception:  # malformed encoded-words: keep what is readable
        return source
    try:
        return str(email.header.make_header(chunks))
    except Exception:
        pass
    # make_header refuses non-ASCII text beside encoded-words (raw UTF-8 next to =?..?=);
    # decode chunk by chunk instead: decode_header hands plain text back as raw-unicode-escape.
    try:
        return "".join(
            chunk if isinstance(chunk, str)
            else chunk.decode("raw-unicode-escape") if charset is None
            else decode_text(chunk, charset)
            for chunk, charset in chunks
        )
    except Exception:
        return source


def decode_text(payload: bytes, declared: str | None) -> str:
    """Decode a text part as a person would read it.

    Order: the declared charset if Python knows it and the bytes fit it; ISO-2022-JP when its
    escape sequence is present (mailers often omit the declaration); strict UTF-8; a statistical
    guess by charset-normalizer; finally Windows-1252, the most common undeclared 8-bit charset in
    mail, which cannot fail.
    """
    if declared:
        try:
            codecs.lookup(declared)
            return payload.decode(declared)
        except (LookupError, UnicodeDecodeError):
            pass
    if _JIS_ESCAPE in payload:
        try:
            return payload.decode("iso-2022-jp")
        except UnicodeDecodeError:
            pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best = charset_normalizer.from_bytes(payload[:65536]).best()
    if best is not None and best.encoding not in ("utf_8",):
        try:
            return payload.decode(best.encoding)
        except (LookupError, UnicodeDecodeError):
            pass
    return payload.decode("cp1252", errors="replace")


class _RobustMailParser(mailparser.MailParser):  # type: ignore[misc]
    """mail-parser with our charset handling for body parts, and one crash fixed."""

    @property
    def defects_categories(self) -> set[str]:
        """The defect categories, minus the epilogue ones when there is no epilogue to recover.

        On ``StartBoundaryNotFoundDefect`` mail-parser 4.8 looks for a lost part between the
        boundaries in the top-level epilogue, and raises ``AttributeError``/``TypeError`` when
        the defect sits in a nested part while the top level has no epilogue or no boundary
        (seen in Dovecot's malformed test mails and a SendGrid bounce).  There is nothing to
        recover then; the defect itself is still reported through :attr:`defects`.
        """
        categories = set(self._defects_categories)
        message = self.message
        if message is None or message.epilogue is None or message.get_boundary() is None:
            categories -= _EPILOGUE_DEFECTS
        return categories

    def _make_mail(self, complete: bool = True) -> dict[str, Any]:
        """Nothing: mail-parser builds this summary of every header twice per parse, for its
        ``mail`` and ``mail_partial`` properties, which ticketgate never reads (the fields it
        needs come from the parser's own properties and the message)."""
        return {}

    def _decode_body_payload(self, part: EmailMessage, charset: str, part_index: int) -> str:
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            return ""
        return decode_text(payload, part.get_content_charset())


class MailLimitExceeded(ParseError):
    """The mail is over one of the hostile-input limits; its message is the reason."""


def single_line(value: str) -> str:
    """A value for a one-line field: control characters dropped, white space collapsed."""
    return " ".join(_CONTROL.sub("", value).split())


_CONTENT_TYPE_FIELD = re.compile(rb"(?im)^content-type[ \t]*:")


def _check_raw_limits(raw: bytes) -> None:
    """Cheap checks on the bytes, before any parser spends time on them."""
    end = re.search(rb"\r?\n\r?\n", raw)
    head = raw[: end.start()] if end else raw
    if len(head) > MAX_HEADER_BYTES:
        raise MailLimitExceeded(f"header block of {len(head)} bytes (limit {MAX_HEADER_BYTES})")
    fields = len(re.findall(rb"(?m)^[^ \t\r\n]", head))
    if fields > MAX_HEADER_FIELDS:
        raise MailLimitExceeded(f"{fields} header fields (limit {MAX_HEADER_FIELDS})")
    # Every Content-Type field has a colon: counting colons (a fraction of the regex's cost
    # over a whole mail) settles nearly every mail without the regex.
    if raw.count(b":") <= MAX_MIME_PARTS:
        return
    declared = len(_CONTENT_TYPE_FIELD.findall(raw))
    if declared > MAX_MIME_PARTS:
        raise MailLimitExceeded(f"{declared} MIME parts declared (limit {MAX_MIME_PARTS})")


def _check_structure(message: EmailMessage) -> EmailMessage:
    """Count parts and nesting without recursion (the stdlib's walk() recurses)."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    parts = 0
    while stack:
        part, depth = stack.pop()
        parts += 1
        if parts > MAX_MIME_PARTS:
            raise MailLimitExceeded(f"more than {MAX_MIME_PARTS} MIME parts")
        if depth > MAX_MIME_DEPTH:
            raise MailLimitExceeded(f"MIME nesting deeper than {MAX_MIME_DEPTH}")
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, EmailMessage))
    return message


def _without_trace_headers(message: EmailMessage) -> EmailMessage:
    """The message as mail-parser should see it: without its Received headers.

    mail-parser splits every Received header into its clauses and dates, a tenth of a parse,
    for its ``received`` property, which ticketgate never reads (the hop data it needs, the
    client's address and HELO, comes from the SMTP envelope).  The copy shares the parts with
    the original; only its header list is its own, so the stored mail keeps every header.
    """
    view = copy.copy(message)
    del view["Received"]  # builds a new header list: the original's is untouched
    return view


def _addresses(parser: Any, name: str) -> list[tuple[str, str]]:
    try:
        pairs = getattr(parser, name) or []
    except Exception:
        return []
    out: list[tuple[str, str]] = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            continue
        display, address = str(pair[0] or ""), str(pair[1] or "")
        address = address.strip()
        if "@" not in address:
            match = _ADDRESS_RE.search(display)
            if not match:
                continue
            address = match.group(0)
        out.append((single_line(display), single_line(address)))
    return out


def safe_filename(name: str) -> str:
    """A file name that is safe to show and to write anywhere: no path, no control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_FILENAME.sub("_", name).strip(" .")
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: MAX_FILENAME - len(ext) - 1] + dot + ext) if dot else name[:MAX_FILENAME]
    return name or "attachment"


def _fallback_name(part: EmailMessage, index: int, content_id: str | None) -> str:
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "message/global"):
        inner = part.get_payload()
        subject = ""
        if isinstance(inner, list) and inner:
            subject = decode_header_value(inner[0].get("Subject", ""))
        return safe_filename((subject or "forwarded-message")[:100]) + ".eml"
    if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
        return "returned-headers.txt"
    ext = mimetypes.guess_extension(ctype) or ".bin"
    if content_id:
        return safe_filename(content_id.split("@", 1)[0] + ext)
    return f"attachment-{index}{ext}"


def _lenient_bytes(message: EmailMessage) -> bytes:
    """An attached mail as bytes when the stdlib generator refuses it (it re-encodes text parts
    and raises on a charset such as ``binary`` or on text the charset cannot hold): the header
    fields as parsed and each leaf's payload as it was, boundaries rebuilt, no recursion."""
    out: list[bytes] = []
    stack: list[tuple[Any, bytes | None]] = [(message, None)]
    while stack:
        part, closing = stack.pop()
        if part is None:
            out.append(closing or b"")
            continue
        for name, value in part.items():
            out.append(f"{name}: {value}\n".encode("utf-8", "surrogateescape"))
        out.append(b"\n")
        payload = part.get_payload()
        if isinstance(payload, list):
            boundary = (part.get_boundary() or "boundary").encode("utf-8", "surrogateescape")
            stack.append((None, b"--" + boundary + b"--\n"))
            for child in reversed([p for p in payload if isinstance(p, EmailMessage)]):
                stack.append((child, None))
                stack.append((None, b"--" + boundary + b"\n"))
        else:
            out.append(str(payload or "").encode("utf-8", "surrogateescape") + b"\n")
    return b"".join(out)


def _part_bytes(part: EmailMessage) -> bytes:
    if part.get_content_type() in _WHOLE_PARTS:
        inner = part.get_payload()
        if isinstance(inner, list) and inner:
            try:
                return inner[0].as_bytes()
            except Exception:  # the generator re-encodes text parts: unknown or bad charsets
                try:
                    return _lenient_bytes(inner[0])
                except Exception:
                    return b""
    try:
        data = part.get_payload(decode=True)
    except (binascii.Error, ValueError):
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=False)
        except binascii.Error:
            return raw.encode("utf-8", "surrogateescape")
    return b""


def _walk_attachments(message: EmailMessage, hint: str | None = None) -> list[ParsedAttachment]:
    """Every part that is not the body: files, inline images, attached mails (kept whole).

    ``hint`` is the charset for raw 8-bit bytes in file names (see :func:`header_charset`).
    """
    found: list[ParsedAttachment] = []
    skip: set[int] = set()
    for index, part in enumerate(message.walk()):
        if id(part) in skip:
            continue
        ctype = part.get_content_type()
        if ctype in _WHOLE_PARTS:
            payload = part.get_payload()
            if isinstance(payload, list):
                for inner in payload:
                    skip.update(id(p) for p in inner.walk())
        elif part.is_multipart():
            continue
        disposition = (part.get_content_disposition() or "").lower()
        try:
            raw_name = part.get_filename()
        except Exception:
            raw_name = None
        filename = (
            decode_header_value(raw_name, part.get_content_charset() or hint) if raw_name else None
        )
        if ctype in ("text/plain", "text/html") and not filename and disposition != "attachment":
            continue
        if ctype in ("message/delivery-status", "message/disposition-notification") and (
            disposition != "attachment"
        ):
            continue
        content_id = normalize_message_id(part.get("Content-ID"))
        data = _part_bytes(part)
        name = safe_filename(filename) if filename else _fallback_name(part, index, content_id)
        inline = disposition == "inline" or (content_id is not None and disposition != "attachment")
        if tnef.is_tnef(ctype, name):
            unpacked = tnef.unpack(data)
            if unpacked is not None:
                found.extend(unpacked)
                continue
        found.append(
            ParsedAttachment(
                filename=name,
                content_type=ctype,
                data=data,
                content_id=content_id,
                inline=inline,
            )
        )
    return found


def html_to_text(html: str) -> str:
    try:
        text = get_text(html)
    except Exception:
        text = re.sub(r"<[^>]+>", " ", html)
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def sanitize_html(html: str) -> str:
    """Stored HTML is what nh3 (Ammonia) lets through: no script, no handlers, no remote forms."""
    return nh3.clean(html, url_schemes={"http", "https", "mailto", "cid", "tel"},
                     clean_content_tags={"script", "style", "title"})


def parse_mail(raw: bytes) -> ParsedMail:
    """Parse raw bytes; raises :class:`ParseError` when nothing mail-like can be read, and
    :class:`MailLimitExceeded` when the mail is over a hostile-input limit."""
    _check_raw_limits(raw)
    try:
        message = _check_structure(email.message_from_bytes(raw))
        parser = _RobustMailParser(_without_trace_headers(message))
    except MailLimitExceeded:
        raise
    except Exception as exc:  # mail-parser raises many types on hostile input (RecursionError)
        raise ParseError(f"mail could not be parsed: {type(exc).__name__}: {exc}") from exc
    froms = _addresses(parser, "from_")
    sender = _addresses(parser, "sender")
    if not froms:
        froms = sender
    from_name, from_address = froms[0] if froms else ("", "")
    plain = [t for t in parser.text_plain if t and t.strip()]
    html_parts = [t for t in parser.text_html if t and t.strip()]
    html = "\n".join(html_parts)
    text = "\n\n".join(t.strip("\n") for t in plain) if plain else html_to_text(html)
    # Mail over SMTP arrives with CRLF, from files often with LF: store one form.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    hint = header_charset(message)
    attachments = _walk_attachments(message, hint)
    tnef_body = next((a for a in attachments if a.origin == "tnef-body"), None)
    if tnef_body is not None:
        attachments.remove(tnef_body)
        if not text.strip():
            text = decode_text(tnef_body.data, None)
    if len(attachments) > MAX_ATTACHMENTS:
        raise MailLimitExceeded(f"{len(attachments)} attachments (limit {MAX_ATTACHMENTS})")
    total = sum(len(a.data) for a in attachments)
    if total > MAX_ATTACHMENT_BYTES:
        raise MailLimitExceeded(f"attachments of {total} bytes (limit {MAX_ATTACHMENT_BYTES})")
    for part in attachments:
        part.content_id = single_line(part.content_id) or None if part.content_id else None
    date = None
    try:
        date_value = parser.date
        if isinstance(date_value, dt.datetime):
            date = date_value if date_value.tzinfo else date_value.replace(tzinfo=dt.UTC)
    except Exception:
        date = None
    header_block = "".join(f"{k}: {_header_source(v, hint)}\n" for k, v in message.items())
    defects = []
    for entry in parser.defects or []:
        for key, values in entry.items():
            defects.extend(f"{key}: {v}" for v in values)
    return ParsedMail(
        message=message,
        subject=single_line(decode_header_value(message.get("Subject", ""), hint)),
        message_id=single_line(normalize_message_id(message.get("Message-ID")) or "") or None,
        in_reply_to=[single_line(i) for i in _ids(str(message.get("In-Reply-To", "") or ""))],
        references=[single_line(i) for i in
                    _ids(" ".join(str(v) for v in message.get_all("References", [])))],
        from_name=from_name,
        from_address=from_address.lower(),
        reply_to=_addresses(parser, "reply_to"),
        sender=sender,
        to=_addresses(parser, "to"),
        cc=_addresses(parser, "cc"),
        date=date,
        text=text,  # NUL kept (faithful); the store drops it where the database cannot hold it
        html=sanitize_html(html).replace("\x00", "") if html else "",
        attachments=attachments,
        defects=defects,
        header_block=header_block.replace("\x00", ""),
        header_charset=hint,
    )

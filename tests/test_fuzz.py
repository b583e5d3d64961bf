"""Hostile input: generated MIME trees and headers, mutated corpus mails, and the parser limits.

design.md invariant 5: malformed, oversized and hostile mail gets a clear answer and a recorded
reason, and never crashes a process.  Here that means, for every input:

* :func:`ingest.parse.parse_mail` returns or raises :class:`~ingest.errors.ParseError` (of which
  :class:`~ingest.parse.MailLimitExceeded` is one), nothing else;
* :meth:`Ingestor.ingest` on SQLite returns a TicketInfo whose action is a final state, or
  raises :class:`RecordedError` (not a mail at all, recorded as rejected); the inbound record is
  in that final state, with a reason unless it created or appended; and no pipeline step raised
  (a ``quarantined`` record whose reason is ``processing failed`` would be a bug found);
* nothing that ticketgate stores in a one-line field (title, subject, names, addresses, ids,
  file names) carries CR, LF or NUL, and stored HTML carries no script, event handler or
  ``javascript:`` URL.

Sizes: ``FUZZ_PARSE_EXAMPLES`` generated mails through the parser, ``FUZZ_PIPELINE_EXAMPLES``
through the whole pipeline, and a mutation run over the shared corpus bounded by
``MUTATION_CASES`` and ``MUTATION_SECONDS`` (``TICKETGATE_FUZZ_SCALE`` multiplies all three).
Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import base64
import html as htmllib
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ingest import parse as parse_module
from ingest import tnef
from ingest.config import load_settings
from ingest.errors import ParseError
from ingest.models import FINAL_STATES, Attachment, InboundMail, Message, Ticket
from ingest.parse import MailLimitExceeded, ParsedMail, parse_mail, safe_filename
from ingest.service import Ingestor, RecordedError
from ingest.spool import Envelope
from tests.dnszone import unused_port

SCALE = float(os.environ.get("TICKETGATE_FUZZ_SCALE", "1"))
FUZZ_PARSE_EXAMPLES = int(300 * SCALE)
FUZZ_PIPELINE_EXAMPLES = int(150 * SCALE)
MUTATION_CASES = int(600 * SCALE)
MUTATION_SECONDS = 45.0 * SCALE
CORPUS = Path(os.environ.get("TICKETGATE_CORPUS")
              or Path(__file__).resolve().parents[2] / "shared" / "corpus")
LINE_BREAKING = re.compile(r"[\r\n\x00]")

CONFIG = """
[service]
base_url = "https://support.example.com"

[authentication]
nameservers = ["127.0.0.1"]
dns_port = {port}
dns_timeout = 0.2
trusted_authserv_ids = ["mx.fuzz.test"]

[[category]]
name = "General"
[[priority]]
name = "Medium"
[[person]]
email = "known@customer.test"
[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
category = "General"
priority = "Medium"
"""


@pytest.fixture(scope="module")
def fuzz_ingestor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingestor]:
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "ticketgate.toml"
    path.write_text(CONFIG.format(port=unused_port()), encoding="utf-8")
    ingestor = Ingestor(load_settings(path, database_url=f"sqlite:///{tmp / 'fuzz.db'}"))
    yield ingestor
    ingestor.close()


# --- strategies -------------------------------------------------------------------------------

CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "iso-2022-jp", "koi8-r",
            "gb18030", "shift_jis", "utf-7", "utf-16", "x-unknown", "unknown-8bit", "",
            "utf-8*en", "ISO-8859-8-I", "\"utf-8\"", "binary"]
HEADER_NAMES = ["Subject", "From", "To", "Cc", "Reply-To", "Sender", "Message-ID",
                "In-Reply-To", "References", "Date", "Return-Path", "Auto-Submitted",
                "Precedence", "X-Loop", "List-Id", "Authentication-Results", "DKIM-Signature",
                "Content-Type", "Content-Transfer-Encoding", "MIME-Version", "X-Priority",
                "Content-Disposition", "Received"]
junk_bytes = st.binary(min_size=0, max_size=200)
text_chunk = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@st.composite
def encoded_word(draw: st.DrawFn) -> str:
    charset = draw(st.sampled_from(CHARSETS)) or "utf-8"
    payload = draw(text_chunk).encode("utf-8", "replace")
    if draw(st.booleans()):
        body = base64.b64encode(payload).decode()
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]  # broken padding
        return f"=?{charset}?B?{body}?="
    quoted = "".join(f"={b:02X}" if b > 126 or b in b"=?_ \t" else chr(b) for b in payload)
    return f"=?{charset}?{draw(st.sampled_from(['Q', 'q', 'X']))}?{quoted}?="


header_value = st.one_of(
    text_chunk,
    encoded_word(),
    st.lists(st.one_of(text_chunk, encoded_word()), max_size=4).map(" ".join),
    st.sampled_from(["", " ", "<>", "<a@b>", "a@b, c@d", "=?utf-8?q?x=0D=0ABcc:_evil@x?=",
                     "\"Last, First\" <first@known.test>", "<x\r\n Bcc: y@z>", "(((((",
                     "mx.fuzz.test; dmarc=fail (p=reject) header.from=customer.test",
                     "mx.fuzz.test; spf=pass smtp.mailfrom=known@customer.test"]),
    st.integers(0, 3).map(lambda n: "x" * (n * 3000)),  # long lines
)


@st.composite
def header_lines(draw: st.DrawFn) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES),
                              st.from_regex(r"[!-9;-~]{1,20}", fullmatch=True)))
        value = draw(header_value).encode("utf-8", "surrogateescape")
        if draw(st.integers(0, 9)) == 0:
            value += draw(junk_bytes).replace(b"\n", b" ")  # raw 8-bit junk
        repeat = draw(st.sampled_from([1, 1, 1, 2, 30]))  # duplicated headers
        lines += [name.encode() + b": " + value] * repeat
    return lines


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/octet-stream",
                                  "image/png", "application/ms-tnef", "message/delivery-status",
                                  "text/rfc822-headers", "application/pdf", "text/calendar",
                                  "garbage", "text/"]))
    charset = draw(st.sampled_from(CHARSETS))
    cte = draw(st.sampled_from(["", "7bit", "8bit", "base64", "quoted-printable", "x-uuencode",
                                "binary", "bogus"]))
    headers = [f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "")]
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    if draw(st.booleans()):
        name = draw(st.one_of(text_chunk, encoded_word(),
                              st.sampled_from(["../../etc/passwd", "C:\\boot.ini", "winmail.dat",
                                               "a\u202egpj.exe", "con", "", "."])))
        headers.append(f"Content-Disposition: {draw(st.sampled_from(['attachment', 'inline']))};"
                       f" filename=\"{name}\"")
    if draw(st.booleans()):
        headers.append(f"Content-ID: <{draw(text_chunk)}>")
    body = draw(st.one_of(
        text_chunk.map(lambda t: t.encode("utf-8")),
        junk_bytes,
        st.sampled_from([b"<script>alert(1)</script><a href='javascript:x'>x</a>",
                         b"<img src=x onerror=alert(1)><svg onload=alert(2)>",
                         b"=\r\n=ZZ=3", b"begin 644 x\r\nM(((\r\nend\r\n", b"\x00" * 50]),
    ))
    if cte == "base64" and draw(st.booleans()):
        body = base64.encodebytes(body)
    head = "\r\n".join(headers).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + body


def _multipart(draw: st.DrawFn, children: list[bytes]) -> bytes:
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "report", "signed",
                                    "digest", "x-weird"]))
    boundary = draw(st.sampled_from(["b1", "b1", "=_x", "", "a b", "b1--", "-" * 80]))
    params = f"; boundary=\"{boundary}\"" if boundary else ""
    if subtype == "report":
        params += "; report-type=delivery-status"
    out = [f"Content-Type: multipart/{subtype}{params}".encode(), b"",
           draw(junk_bytes.map(lambda b: b.replace(b"--", b"")))]  # preamble
    real = boundary if draw(st.integers(0, 4)) else "other"  # wrong delimiter now and then
    for child in children:
        out += [f"--{real}".encode(), child]
    if draw(st.integers(0, 3)):
        out.append(f"--{real}--".encode())  # or never closed
    return b"\r\n".join(out)


@st.composite
def mime_tree(draw: st.DrawFn) -> bytes:
    node = st.recursive(leaf(), lambda kids: st.one_of(
        st.lists(kids, max_size=4).map(lambda ks: ("multi", ks)),
        kids.map(lambda inner: ("rfc822", inner)),
    ), max_leaves=12)

    def render(item: Any) -> bytes:
        if isinstance(item, bytes):
            return item
        kind, payload = item
        if kind == "rfc822":
            return (b"Content-Type: message/rfc822\r\n\r\nFrom: inner@x.test\r\n"
                    b"Subject: inner\r\n" + render(payload))
        return _multipart(draw, [render(p) for p in payload])

    return render(draw(node))


@st.composite
def hostile_mail(draw: st.DrawFn) -> bytes:
    base = [b"From: " + draw(st.sampled_from([
        b"Known <known@customer.test>", b"stranger@else.test", b"", b"<>", b"a@b@c",
        b"=?utf-8?q?Evil=0D=0ABcc=3A_x=40y?= <evil@x.test>", b"MAILER-DAEMON"])),
        b"To: support@example.com"]
    if draw(st.booleans()):
        base.append(b"Message-ID: <" + draw(text_chunk).encode("utf-8") + b"@fuzz>")
    lines = base + draw(header_lines())
    draw(st.randoms()).shuffle(lines)
    body = draw(mime_tree())
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = sep.join(lines) + sep + body
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated anywhere
    return raw


# --- checks -----------------------------------------------------------------------------------


def check_parsed(mail: ParsedMail) -> None:
    one_line = [mail.subject, mail.from_name, mail.from_address, mail.message_id or "",
                *mail.in_reply_to, *mail.references]
    for pairs in (mail.to, mail.cc, mail.reply_to, mail.sender):
        for name, address in pairs:
            one_line += [name, address]
    for part in mail.attachments:
        one_line += [part.filename, part.content_id or ""]
        assert part.filename == safe_filename(part.filename) or part.filename.endswith(".eml")
    for value in one_line:
        assert not LINE_BREAKING.search(value), repr(value)
    assert "\x00" not in mail.html  # body text may keep NUL: the store handles it per database
    check_html(mail.html)


_HANDLER = re.compile(r"<[^>]*[\s/\"']on[a-z]+\s*=", re.I)
_DANGEROUS_TAG = re.compile(r"<\s*(script|iframe|object|embed|meta|base|form|svg|math|link)\b",
                            re.I)


def check_html(stored: str) -> None:
    unescaped = htmllib.unescape(stored)
    compact = re.sub(r"[\s\x00-\x1f]+", "", unescaped).lower()
    assert not _DANGEROUS_TAG.search(stored), stored[:300]
    assert not _HANDLER.search(stored), stored[:300]
    assert "javascript:" not in compact and "vbscript:" not in compact, stored[:300]
    assert not re.search(r"(href|src)=\"?data:", stored, re.I), stored[:300]


def ingest_checked(ing: Ingestor, raw: bytes, door: str = "smtp") -> str:
    """Run one mail through the pipeline and check invariant 3 and 5 on what was recorded."""
    envelope = Envelope(mail_from="fuzz@else.test", rcpt_to=["support@example.com"],
                        client_ip="127.0.0.1", helo="fuzz.test")
    try:
        info = ing.ingest(raw, 1, door=door, source="fuzz", envelope=envelope)
    except RecordedError as exc:
        info = exc.info
    assert info.Action in FINAL_STATES, info
    with ing.session() as s:
        inbound = s.get(InboundMail, info.InboundId)
        assert inbound is not None
        if inbound.state == "duplicate":
            return "duplicate"
        assert inbound.state == info.Action, (inbound.state, info)
        assert inbound.reason != "processing failed", (
            f"a step raised: {inbound.error}", inbound.trace[-1:])
        if inbound.state not in ("created", "appended"):
            assert inbound.reason, inbound.state
        if inbound.ticket_message_id:
            message = s.get(Message, inbound.ticket_message_id)
            assert message is not None
            ticket = s.get(Ticket, message.ticket_id)
            assert ticket is not None
            for value in (ticket.title, ticket.author, ticket.from_address, message.subject,
                          message.from_name, message.from_address, message.author,
                          message.message_id or "", message.in_reply_to or "",
                          *message.references):
                assert not LINE_BREAKING.search(value), repr(value)
            check_html(message.body_html)
            for attachment in s.scalars(select(Attachment).where(
                    Attachment.message_id == message.id)):
                assert not LINE_BREAKING.search(attachment.filename)
                assert attachment.filename == safe_filename(attachment.filename) or (
                    attachment.filename.endswith(".eml"))
    return inbound.state


# --- generated input --------------------------------------------------------------------------


@settings(max_examples=FUZZ_PARSE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=hostile_mail())
def test_parser_never_raises_anything_but_parse_error(raw: bytes) -> None:
    try:
        mail = parse_mail(raw)
    except ParseError:
        return
    check_parsed(mail)


PIPELINE_RESULTS: Counter[str] = Counter()


@settings(max_examples=FUZZ_PIPELINE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(raw=hostile_mail(), door=st.sampled_from(["smtp", "imap", "http", "replay"]))
def test_pipeline_records_every_hostile_mail(fuzz_ingestor: Ingestor, raw: bytes, door: str
                                             ) -> None:
    PIPELINE_RESULTS[ingest_checked(fuzz_ingestor, raw, door)] += 1


def test_pipeline_fuzz_summary() -> None:
    if PIPELINE_RESULTS:
        print(f"\nhypothesis pipeline run: {sum(PIPELINE_RESULTS.values())} mails, "
              f"{dict(PIPELINE_RESULTS)}")


# --- mutated corpus mails ---------------------------------------------------------------------


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file()
                  and p.suffix.lower() not in (".json", ".md", ".txt", ".py", ".rb", ".pl")
                  and p.stat().st_size < 2_000_000)


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["bitflip", "truncate", "duplicate-header", "drop-boundary", "splice",
                       "line-endings", "junk-header"])
    data = bytearray(raw)
    if kind == "bitflip" and data:
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == "duplicate-header":
        lines = bytes(data).split(b"\n")
        head = [i for i, line in enumerate(lines[:80]) if b":" in line[:80]]
        if head:
            i = rng.choice(head)
            lines[i:i] = [lines[i]] * rng.choice([2, 50, 500])
        data = bytearray(b"\n".join(lines))
    elif kind == "drop-boundary":
        data = bytearray(re.sub(rb"(?m)^--[^\r\n]*$", b"", bytes(data), count=rng.randint(1, 3)))
    elif kind == "splice" and data:
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    elif kind == "line-endings":
        data = bytearray(bytes(data).replace(b"\r\n", b"\n").replace(b"\n", rng.choice(
            [b"\r", b"\r\r\n", b"\n\r"])))
    else:
        data[0:0] = b"X-Junk: " + bytes(rng.randrange(1, 256) for _ in range(2000)).replace(
            b"\n", b"") + b"\r\n"
    return kind, bytes(data)


def test_mutated_corpus_mails_end_in_a_recorded_state(fuzz_ingestor: Ingestor,
                                                      tmp_path: Path) -> None:
    files = corpus_files()
    if not files:
        if os.environ.get("TICKETGATE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"corpus not found at {CORPUS}")
        pytest.skip(f"corpus not found at {CORPUS}")
    rng = random.Random(int(os.environ.get("TICKETGATE_FUZZ_SEED", "20261122")))
    started = time.monotonic()
    results: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    cases = 0
    while cases < MUTATION_CASES and time.monotonic() - started < MUTATION_SECONDS:
        path = rng.choice(files)
        kind, raw = mutate(path.read_bytes(), rng)
        try:
            parsed = parse_mail(raw)
        except ParseError:
            parsed = None
        if parsed is not None:
            check_parsed(parsed)
        results[ingest_checked(fuzz_ingestor, raw, rng.choice(["smtp", "imap", "replay"]))] += 1
        kinds[kind] += 1
        cases += 1
    took = time.monotonic() - started
    report = {"cases": cases, "seconds": round(took, 1), "files": len(files),
              "results": dict(results), "mutations": dict(kinds)}
    (tmp_path / "mutation-report.json").write_text(json.dumps(report, indent=2))
    print(f"\ncorpus mutation run: {json.dumps(report)}")
    assert cases >= min(100, MUTATION_CASES)


# --- limits and sanitising, one control each --------------------------------------------------


def plain(headers: str = "", body: str = "hello\r\n", subject: str = "Hello") -> bytes:
    return (f"From: a@customer.test\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
            f"{headers}\r\n{body}").encode("utf-8", "surrogateescape")


def test_too_many_header_fields_is_rejected(fuzz_ingestor: Ingestor) -> None:
    raw = plain("".join(f"X-Spam-{i}: {i}\r\n" for i in range(parse_module.MAX_HEADER_FIELDS)))
    info = fuzz_ingestor.ingest(raw, 1)
    assert info.Action == "rejected"
    assert (info.Reason or "").startswith("over a parser limit: ")
    assert "header fields" in (info.Reason or "")


def test_huge_header_block_is_rejected(fuzz_ingestor: Ingestor) -> None:
    raw = plain("References: " + " ".join(f"<{i}@x>" for i in range(120_000)) + "\r\n")
    info = fuzz_ingestor.ingest(raw, 1)
    assert info.Action == "rejected" and "header block" in (info.Reason or "")


def nested(depth: int) -> bytes:
    inner = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    for i in range(depth):
        b = f"b{i}".encode()
        inner = (b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n--' + b
                 + b"\r\n" + inner + b"\r\n--" + b + b"--\r\n")
    return b"From: a@customer.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + inner


def test_deep_mime_nesting_is_rejected_quickly(fuzz_ingestor: Ingestor) -> None:
    started = time.monotonic()
    info = fuzz_ingestor.ingest(nested(parse_module.MAX_MIME_DEPTH + 10), 1)
    assert info.Action == "rejected" and "nesting deeper than" in (info.Reason or "")
    assert fuzz_ingestor.ingest(nested(parse_module.MAX_MIME_DEPTH - 5), 1).Action == "created"
    many = fuzz_ingestor.ingest(nested(5000), 1)  # the stdlib parser would recurse to death
    assert many.Action == "rejected" and "MIME parts declared" in (many.Reason or "")
    assert time.monotonic() - started < 30


def with_attachments(count: int, size: int = 10) -> bytes:
    parts = [b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"]
    for i in range(count):
        parts.append(b"--b\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename=\"f" + str(i).encode()
                     + b".bin\"\r\n\r\n" + b"x" * size + b"\r\n")
    return (b"From: a@customer.test\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n" + b"".join(parts)
            + b"--b--\r\n")


def test_attachment_count_and_total_size_limits(fuzz_ingestor: Ingestor,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    info = fuzz_ingestor.ingest(with_attachments(parse_module.MAX_ATTACHMENTS + 1), 1)
    assert info.Action == "rejected" and "attachments (limit" in (info.Reason or "")
    monkeypatch.setattr(parse_module, "MAX_ATTACHMENT_BYTES", 1000)
    with pytest.raises(MailLimitExceeded, match="attachments of 2000 bytes"):
        parse_mail(with_attachments(2, size=1000))


def test_tnef_unpacking_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """tnef.unpack refuses blobs over MAX_TNEF_BYTES and garbage, keeping the raw part; the
    compressed RTF body (the only compressed stream in TNEF) is never decompressed."""
    assert tnef.unpack(b"\x78\x9f\x3e\x22" + b"\x00" * 100) is None  # signature, then junk
    monkeypatch.setattr(tnef, "MAX_TNEF_BYTES", 10)
    assert tnef.unpack(b"\x78\x9f\x3e\x22" + b"\x00" * 11) is None
    mail = parse_mail(b"From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
                      b" boundary=b\r\n\r\n--b\r\nContent-Type: application/ms-tnef\r\n"
                      b"Content-Disposition: attachment; filename=winmail.dat\r\n\r\n"
                      b"\x78\x9f\x3e\x22garbage\r\n--b--\r\n")
    assert [a.filename for a in mail.attachments] == ["winmail.dat"]
    assert "rtfbody" not in Path(tnef.__file__).read_text()


@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
    ("C:\\Users\\x\\report.pdf", "report.pdf"),
    ("invoice\u202efdp.exe", "invoice_fdp.exe"),
    ("a\r\nX-Evil: 1.txt", "a_X-Evil_ 1.txt"),
    ("nul\x00byte.txt", "nul_byte.txt"),
    ("...", "attachment"),
    ("   ", "attachment"),
    ("x" * 300 + ".pdf", "x" * 176 + ".pdf"),
    ('we"ird<>|?*:name.doc', "we_ird_name.doc"),
])
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


XSS = [
    "<a href=\"https://support.example.com/ok\">kept</a>",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg/onload=alert(1)>",
    "<a href=\"javascript:alert(1)\">a</a>",
    "<a href=\"JaVaScRiPt:alert(1)\">b</a>",
    "<a href=\"jav&#x09;ascript:alert(1)\">c</a>",
    "<a href=\"&#106;avascript:alert(1)\">d</a>",
    "<a href=\" javascript:alert(1)\">e</a>",
    "<a href=\"vbscript:msgbox(1)\">f</a>",
    "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">g</a>",
    "<iframe src=\"https://evil.test\"></iframe>",
    "<body onload=alert(1)>",
    "<div style=\"background:url(javascript:alert(1))\">h</div>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "<form action=\"javascript:alert(1)\"><input type=submit></form>",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert(1)\">",
    "<object data=\"x.swf\"></object><embed src=\"x.swf\">",
    "<base href=\"javascript:alert(1)//\">",
    "<p title=\"x\" onmouseover=\"alert(1)\">i</p>",
]


def test_stored_html_is_sanitised(fuzz_ingestor: Ingestor) -> None:
    body = "<html><body>" + "\n".join(XSS) + "</body></html>"
    raw = plain("MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n", body,
                subject="xss")
    info = fuzz_ingestor.ingest(raw, 1)
    assert info.Action == "created"
    with fuzz_ingestor.session() as s:
        message = s.scalars(select(Message).where(Message.ticket_id == info.TicketId)).one()
        stored = message.body_html
    check_html(stored)
    assert 'href="https://support.example.com/ok"' in stored  # sanitising, not deleting


def test_no_line_breaks_or_nul_reach_stored_one_line_fields(fuzz_ingestor: Ingestor) -> None:
    raw = (b"From: =?utf-8?q?Evil=0D=0ABcc=3A_x=40y?= <evil@else.test>\r\n"
           b"To: support@example.com\r\n"
           b"Subject: =?utf-8?q?Hello=0D=0AX-Injected=3A_yes=00?=\r\n"
           b"Message-ID: <inj\x01ect@else.test>\r\n"
           b"References: <a\x00b@x> <c@d>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhi\x00there\r\n"
           b"--b\r\nContent-Type: application/pdf\r\nContent-ID: <cid\r\n x@y>\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''a%0D%0AX-Evil%3A%201.pdf\r\n\r\n"
           b"%PDF\r\n--b--\r\n")
    info = fuzz_ingestor.ingest(raw, 1)
    assert info.Action == "created"
    for value in (info.Title or "", info.MessageId or "", info.PersonName or ""):
        assert not LINE_BREAKING.search(value)
    assert info.Title == "Hello X-Injected: yes"
    assert ingest_checked(fuzz_ingestor, raw) == "duplicate"
    with fuzz_ingestor.session() as s:
        message = s.scalars(select(Message).where(Message.ticket_id == info.TicketId)).one()
        assert "hi\x00there" in message.body_text  # SQLite keeps it; PostgreSQL gets U+FFFD
        names = [a.filename for a in message.attachments]
        assert names == ["a_X-Evil_ 1.pdf"]

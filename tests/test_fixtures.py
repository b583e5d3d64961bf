"""The scenario mails in fixtures/mail/, replayed in order into an empty database.

``fixtures/expectations.json`` is checked field by field, exactly, and the stored rows are checked
more deeply: attachments, Cc persons, decoded bodies, sanitised HTML.  A second replay of
everything must give only ``duplicate`` and write no ticket rows.  Every test that takes
``db_url`` runs on SQLite and on PostgreSQL (tests/conftest.py).  One more test drives the
``ticketgate replay --json`` command in a subprocess.

When a check fails, the message lists every mismatch as ``file: field: expected ..., got ...``
rather than stopping at the first one.
"""

from __future__ import annotations

import email
import email.policy
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, undefer
from tnefparse import TNEF

from ingest.config import load_settings
from ingest.models import (
    Attachment,
    InboundMail,
    Message,
    Person,
    Ticket,
    TicketSecondaryPerson,
)
from ingest.service import Ingestor, RecordedError
from ingest.ticketinfo import TicketInfo

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
MAIL_DIR = FIXTURES / "mail"
CONFIG = FIXTURES / "ticketgate.toml"
MAILS = sorted(MAIL_DIR.glob("*.eml"))
EXPECTATIONS: dict[str, dict[str, Any]] = json.loads(
    (FIXTURES / "expectations.json").read_text(encoding="utf-8")
)
TICKETINFO_KEYS = {
    "TicketId", "Title", "OwnerName", "CategoryName", "PriorityName", "TicketUrl", "PersonName",
    "ContactName", "TableRight", "FieldProperties", "Action", "Reason", "MessageId",
    "ThreadedBy", "InboundId", "TicketNumber",
}
# Mails that no person wrote: DSNs, out-of-office from a server, list traffic.
AUTOMATIC = {
    "06-auto-reply-with-tag.eml",
    "08-bounce-known-postfix.eml",
    "09-bounce-known-exchange.eml",
    "10-bounce-unknown.eml",
    "11-mailing-list.eml",
}
# Gmail's web interface (and Google Workspace) send neither X-Mailer nor User-Agent.
WEBMAIL = {"13-unknown-sender.eml", "18-spam-vendor-rule.eml"}


def _tool(name: str) -> ModuleType:
    """A script from fixtures/tools/ (not a package), imported by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_tnef = _tool("make_tnef")
make_fixtures = _tool("make_fixtures")


# --- helpers --------------------------------------------------------------------------------


def header_message_id(path: Path) -> str | None:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    value = msg.get("Message-ID")
    return str(value).strip().strip("<>") if value else None


def mismatches(name: str, got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    problems = []
    reason = got.get("Reason") or ""
    if "Action" in expected and got.get("Action") != expected["Action"]:
        # the other fields follow from the action; one line says it all
        return [f"{name}: Action: expected {expected['Action']!r}, got {got.get('Action')!r} "
                f"(TicketId {got.get('TicketId')!r}, Reason {reason!r})"]
    for key, want in expected.items():
        if key == "reason_startswith":
            if not reason.startswith(want):
                problems.append(f"{name}: Reason: expected to start with {want!r}, got {reason!r}")
        elif key == "reason_contains":
            if want not in reason:
                problems.append(f"{name}: Reason: expected to contain {want!r}, got {reason!r}")
        elif got.get(key) != want:
            problems.append(f"{name}: {key}: expected {want!r}, got {got.get(key)!r}")
    return problems


def fail_if(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} mismatch(es):\n  " + "\n  ".join(problems), pytrace=False)


def ingest_file(ingestor: Ingestor, path: Path) -> dict[str, Any]:
    try:
        info = ingestor.ingest(path.read_bytes(), mailbox_id=1, door="replay", source=str(path))
    except RecordedError as exc:  # refused before processing, but recorded all the same
        info = exc.info
    return info.model_dump()


def count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


@dataclass
class Replay:
    ingestor: Ingestor
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def message(self, session: Session, name: str) -> Message | None:
        inbound_id = self.results[name]["InboundId"]
        return session.scalar(select(Message).where(Message.inbound_id == inbound_id))

    def inbound(self, session: Session, name: str) -> InboundMail:
        row = session.get(InboundMail, self.results[name]["InboundId"])
        assert row is not None, f"{name}: no inbound record {self.results[name]['InboundId']}"
        return row

    def attachments(self, session: Session, name: str) -> dict[str, Attachment]:
        message = self.message(session, name)
        if message is None:
            return {}
        rows = session.scalars(
            select(Attachment).where(Attachment.message_id == message.id)
            .options(undefer(Attachment.data)).order_by(Attachment.id)
        )
        return {a.filename: a for a in rows}


@pytest.fixture
def replayed(db_url: str) -> Iterator[Replay]:
    """All fixture mails replayed once, in sorted order, into a fresh database."""
    ingestor = Ingestor(load_settings(CONFIG, database_url=db_url))
    replay = Replay(ingestor)
    for path in MAILS:
        replay.results[path.name] = ingest_file(ingestor, path)
    yield replay
    ingestor.close()


# --- the fixture files themselves -----------------------------------------------------------


def test_every_mail_has_expectations_and_looks_like_real_mail() -> None:
    assert [p.name for p in MAILS] == sorted(EXPECTATIONS), "expectations.json and mail/ differ"
    assert len(MAILS) == 26
    problems = []
    for path in MAILS:
        raw = path.read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        for header in ("Received", "Date", "From", "MIME-Version", "Content-Type"):
            if msg[header] is None:
                problems.append(f"{path.name}: no {header} header")
        if msg["Date"] is not None and msg["Date"].datetime.year != 2026:
            problems.append(f"{path.name}: not dated 2026: {msg['Date']}")
        if (msg["Message-ID"] is None) != (path.name == "25-no-message-id.eml"):
            problems.append(f"{path.name}: Message-ID presence is wrong")
        if path.name not in AUTOMATIC | WEBMAIL and not (msg["X-Mailer"] or msg["User-Agent"]):
            problems.append(f"{path.name}: no X-Mailer or User-Agent")
        defects = [type(d).__name__ for part in msg.walk() for d in part.defects]
        if defects:
            problems.append(f"{path.name}: MIME defects {defects}")
        lines = raw.split(b"\n")[:-1]
        crlf = sum(line.endswith(b"\r") for line in lines)
        if crlf not in (0, len(lines)):
            problems.append(f"{path.name}: mixes CRLF and LF line endings")
    fail_if(problems)


def test_config_loads_with_the_contract_names() -> None:
    settings = load_settings(CONFIG)
    assert settings.service.max_message_bytes == 200_000
    assert [r.name for r in settings.rule] == ["billing", "spam-vendor"]
    assert settings.mailbox_for(1).addresses == ["support@example.com"]


def test_generated_mails_are_up_to_date() -> None:
    assert make_fixtures.main(["make_fixtures.py", "--check"]) == 0


def test_duplicate_delivery_is_mail_01_plus_a_received_header() -> None:
    first = (MAIL_DIR / "01-new-ticket-known-person.eml").read_bytes()
    again = (MAIL_DIR / "12-duplicate-delivery.eml").read_bytes()
    assert first != again
    assert header_message_id(MAIL_DIR / "01-new-ticket-known-person.eml") == header_message_id(
        MAIL_DIR / "12-duplicate-delivery.eml"
    )
    assert again.count(b"\nReceived: ") == first.count(b"\nReceived: ") + 1
    assert first.split(b"\n\n", 1)[1] == again.split(b"\n\n", 1)[1]


def test_oversized_mail_is_over_the_configured_limit() -> None:
    assert (MAIL_DIR / "26-oversized.eml").stat().st_size > load_settings(
        CONFIG
    ).service.max_message_bytes


def test_tnef_encoder_writes_the_ms_oxtnef_attribute_layout() -> None:
    att = make_tnef.attribute(make_tnef.LVL_ATTACHMENT, make_tnef.ATT_ATTACH_TITLE, b"a.txt\0")
    assert att[:1] == b"\x02"
    assert att[1:5] == (0x00018010).to_bytes(4, "little")  # atpString, attAttachTitle
    assert att[5:9] == (6).to_bytes(4, "little")
    assert att[9:15] == b"a.txt\0"
    assert att[15:] == (sum(b"a.txt\0") & 0xFFFF).to_bytes(2, "little")
    stream = make_tnef.encode_tnef([make_tnef.TnefFile("x.bin", b"\xff" * 300)])
    assert stream[:4] == (0x223E9F78).to_bytes(4, "little")
    assert TNEF(stream).attachments[0].data == b"\xff" * 300  # checksum wraps at 16 bits


def test_winmail_dat_in_fixture_22_decodes_with_tnefparse() -> None:
    msg = email.message_from_bytes(
        (MAIL_DIR / "22-tnef-winmail.eml").read_bytes(), policy=email.policy.default
    )
    parts = [p for p in msg.walk() if p.get_content_type() == "application/ms-tnef"]
    assert len(parts) == 1
    assert parts[0].get_filename() == "winmail.dat"
    data = parts[0].get_payload(decode=True)
    tnef = TNEF(data, do_checksum=True)
    assert all(obj.good_checksum for obj in tnef.objects)
    got = {a.long_filename(): a.data for a in tnef.attachments}
    assert got == {
        "report.txt": make_fixtures.SYNC_REPORT.replace("\n", "\r\n").encode("ascii"),
        "dialog.png": make_fixtures.error_dialog_png(),
    }
    assert tnef.body is not None and "batch 7 of 9" in tnef.body


# --- replay: TicketInfo ---------------------------------------------------------------------


def test_replay_gives_the_expected_ticketinfo(replayed: Replay) -> None:
    problems = []
    for path in MAILS:
        got = replayed.results[path.name]
        missing = TICKETINFO_KEYS - set(got)
        if missing:
            problems.append(f"{path.name}: TicketInfo lacks {sorted(missing)}")
        problems += mismatches(path.name, got, EXPECTATIONS[path.name])
        if got["Action"] not in ("rejected", "duplicate"):
            want_id = header_message_id(path)
            if want_id is not None and got["MessageId"] != want_id:
                problems.append(
                    f"{path.name}: MessageId: expected {want_id!r}, got {got['MessageId']!r}"
                )
    fail_if(problems)


# --- replay: what is stored -----------------------------------------------------------------


THREAD_OF_TICKET_1 = {
    "01-new-ticket-known-person.eml": "normal",
    "02-reply-subject-tag.eml": "normal",
    "03-reply-in-reply-to.eml": "normal",
    "04-reply-references.eml": "normal",
    "05-reply-outlook-rewritten-subject.eml": "normal",
    "06-auto-reply-with-tag.eml": "auto-reply",
    "08-bounce-known-postfix.eml": "bounce",
    "09-bounce-known-exchange.eml": "bounce",
}


def test_ticket_1_holds_its_thread_with_auto_reply_and_bounces_labelled(replayed: Replay) -> None:
    problems = []
    with replayed.ingestor.session() as s:
        ticket = s.get(Ticket, 1)
        assert ticket is not None
        by_inbound = {m.inbound_id: m for m in ticket.messages}
        for name, kind in THREAD_OF_TICKET_1.items():
            message = by_inbound.get(replayed.results[name]["InboundId"])
            if message is None:
                problems.append(f"{name}: expected a message on ticket 1, found none")
            elif message.kind != kind:
                problems.append(f"{name}: message kind: expected {kind!r}, got {message.kind!r}")
        if len(ticket.messages) != len(THREAD_OF_TICKET_1):
            problems.append(
                f"ticket 1: expected {len(THREAD_OF_TICKET_1)} messages, got {len(ticket.messages)}"
            )
        if ticket.base_status != "active" or ticket.reopen_count != 0:
            problems.append(f"ticket 1: {ticket.base_status}, reopened {ticket.reopen_count}x")
        spoof = replayed.message(s, "16-spoofed-subject-tag.eml")
        if spoof is None or spoof.ticket_id != 5:
            problems.append("16-spoofed-subject-tag.eml: not stored as ticket 5's message")
        duplicate = replayed.inbound(s, "12-duplicate-delivery.eml")
        if duplicate.duplicate_of_id != replayed.results["01-new-ticket-known-person.eml"][
            "InboundId"
        ]:
            problems.append(f"12-duplicate-delivery.eml: duplicate_of {duplicate.duplicate_of_id}")
        if replayed.message(s, "12-duplicate-delivery.eml") is not None:
            problems.append("12-duplicate-delivery.eml: stored a message")
    fail_if(problems)


def test_every_mail_ends_in_its_recorded_state_and_nothing_more(replayed: Replay) -> None:
    problems = []
    with replayed.ingestor.session() as s:
        for path in MAILS:
            want = EXPECTATIONS[path.name]["Action"]
            inbound = replayed.inbound(s, path.name)
            message = replayed.message(s, path.name)
            if inbound.state != want:
                problems.append(f"{path.name}: inbound state {inbound.state!r}, want {want!r}")
            if want in ("created", "appended"):
                want_ticket = EXPECTATIONS[path.name]["TicketId"]
                if message is None or message.ticket_id != want_ticket:
                    problems.append(f"{path.name}: no message on ticket {want_ticket}")
            elif message is not None:
                problems.append(f"{path.name}: {want}, but a message was stored")
            elif want != "duplicate" and inbound.ticket_id:
                problems.append(f"{path.name}: {want}, but linked to ticket {inbound.ticket_id}")
        created = sum(1 for e in EXPECTATIONS.values() if e["Action"] == "created")
        stored = sum(1 for r in replayed.results.values() if r["Action"] in ("created", "appended"))
        if count(s, Ticket) != created:
            problems.append(f"tickets: expected {created}, got {count(s, Ticket)}")
        if count(s, Message) != stored:
            problems.append(f"messages: {count(s, Message)} rows for {stored} created/appended")
        if count(s, InboundMail) != len(MAILS):
            problems.append(f"inbound records: expected {len(MAILS)}, got {count(s, InboundMail)}")
        key = replayed.inbound(s, "25-no-message-id.eml").idempotency_key
        if not key.startswith("sha256:"):
            problems.append(f"25-no-message-id.eml: idempotency key {key!r}, want sha256:...")
    fail_if(problems)


def test_persons_companies_and_cc(replayed: Replay) -> None:
    problems = []
    with replayed.ingestor.session() as s:
        emails = {p.email.lower(): p for p in s.scalars(select(Person))}
        ticket3 = s.get(Ticket, 3)
        assert ticket3 is not None
        secondary = sorted(p.email.lower() for p in ticket3.secondary_persons)
        if secondary != ["peter@globex.example"]:
            problems.append(f"14-colleague-cc.eml: secondary persons {secondary}, want [peter@]")
        if "support@example.com" in emails:
            problems.append("our own address support@example.com became a person")
        for tid, address, contact in (
            (4, "someone.new@techcorp.com", "TechCorp Solutions"),
            (5, "mallory@evil.example", None),
            (2, "new.customer@gmail.example", None),
        ):
            ticket = s.get(Ticket, tid)
            got = (
                ticket.person.email if ticket and ticket.person else None,
                ticket.contact.name if ticket and ticket.contact else None,
            )
            if got != (address, contact):
                problems.append(f"ticket {tid}: person/company {got}, want {(address, contact)}")
        ticket6 = s.get(Ticket, 6)
        if ticket6 is None or ticket6.tags != ["billing"]:
            problems.append(f"17-billing-rule.eml: tags {ticket6 and ticket6.tags}, want billing")
        # Mail that is ignored must not leave CRM data behind (list, auto-reply, blocked vendor).
        for name, address in (
            ("07-auto-reply-no-reference.eml", "l.novak@brightline-media.example"),
            ("11-mailing-list.eml", "priya@fastmail.example"),
            ("18-spam-vendor-rule.eml", "derek@spammy-vendor.example"),
        ):
            if address in emails:
                problems.append(f"{name}: ignored, but a person {address} was created")
    fail_if(problems)


def test_bodies_are_decoded_and_html_is_sanitised(replayed: Replay) -> None:
    problems = []

    def body(s: Session, name: str) -> Message:
        message = replayed.message(s, name)
        assert message is not None, f"{name}: no stored message"
        return message

    with replayed.ingestor.session() as s:
        for name, fragments in {
            "19-iso-2022-jp.eml": ["管理画面にログインできなくなりました", "高橋 健二"],
            "20-latin1-no-charset.eml": ["Viele Grüße aus Köln", "Jürgen Schäfer", "Gerät"],
            "05-reply-outlook-rewritten-subject.eml": ["Mit freundlichen Grüßen"],
            "14-colleague-cc.eml": ["Med vänliga hälsningar"],
        }.items():
            text = body(s, name).body_text
            for fragment in fragments:
                if fragment not in text:
                    problems.append(f"{name}: body text lacks {fragment!r}")
            if "\ufffd" in text or "\x1b" in text:
                problems.append(f"{name}: body text has replacement or escape characters")

        html_mail = body(s, "21-html-only.eml")
        text = html_mail.body_text
        for fragment in ("Hello Support Team", "order 88213", "Thermal label printer TLP-400"):
            if fragment not in text:
                problems.append(f"21-html-only.eml: body text lacks {fragment!r}")
        if re.search(r"<\s*/?\s*(td|tr|table|p|script|style|html|body|br)\b", text, re.I):
            problems.append("21-html-only.eml: body text still has HTML tags")
        for leak in ("document.cookie", "font-family", "stealSession"):
            if leak in text:
                problems.append(f"21-html-only.eml: body text shows script/style {leak!r}")
        html = html_mail.body_html
        if "<table" not in html or "Thermal label printer TLP-400" not in html:
            problems.append("21-html-only.eml: stored HTML lost the table")
        for leak in ("<script", "document.cookie", "onload", "javascript:", "stealSession"):
            if leak.lower() in html.lower():
                problems.append(f"21-html-only.eml: stored HTML keeps {leak!r}")

        inline_html = body(s, "23-inline-image.eml").body_html
        if f"cid:{make_fixtures.INLINE_CID}" not in inline_html:
            problems.append("23-inline-image.eml: sanitised HTML lost the cid: image reference")
    fail_if(problems)


def test_body_text_uses_one_line_ending_whatever_the_wire_format(replayed: Replay) -> None:
    """CRLF is the wire form of text (RFC 2046 §4.1.1); stored text uses "\\n" for every mail."""
    problems = []
    with replayed.ingestor.session() as s:
        for path in MAILS:
            message = replayed.message(s, path.name)
            if message is not None and "\r" in message.body_text:
                problems.append(f"{path.name}: body_text contains CR characters")
    fail_if(problems)


def test_attachments_tnef_inline_forwarded_and_scanned(replayed: Replay) -> None:
    problems = []

    def check(name: str, filename: str, **want: Any) -> Attachment | None:
        found = replayed.attachments(s, name)
        att = found.get(filename)
        if att is None:
            problems.append(f"{name}: no attachment {filename!r} (found {sorted(found)})")
            return None
        for key, value in want.items():
            got = getattr(att, key)
            if key == "content_id" and got:
                got = got.strip("<>")
            if got != value:
                shown = f"{len(got)} bytes" if isinstance(got, bytes) else repr(got)
                problems.append(f"{name}: {filename}: {key}: got {shown}")
        return att

    with replayed.ingestor.session() as s:
        check(
            "22-tnef-winmail.eml", "report.txt", content_type="text/plain", origin="tnef",
            inline=False,
            data=make_fixtures.SYNC_REPORT.replace("\n", "\r\n").encode("ascii"),
        )
        check(
            "22-tnef-winmail.eml", "dialog.png", content_type="image/png", origin="tnef",
            inline=False, data=make_fixtures.error_dialog_png(),
        )
        check(
            "23-inline-image.eml", make_fixtures.INLINE_NAME, content_type="image/png",
            content_id=make_fixtures.INLINE_CID, inline=True,
            data=make_fixtures.export_error_png(),
        )
        forwarded = check(
            "24-forwarded-eml.eml", "Urgent verify your account within 24 hours.eml",
            content_type="message/rfc822", inline=False,
        )
        if forwarded is not None:
            inner = email.message_from_bytes(forwarded.data, policy=email.policy.default)
            if inner["Subject"] != "Urgent: verify your account within 24 hours":
                problems.append(f"24-forwarded-eml.eml: .eml holds {inner['Subject']!r}")
        scan = check("25-no-message-id.eml", make_fixtures.PDF_NAME,
                     content_type="application/pdf", inline=False)
        if scan is not None and not scan.data.startswith(b"%PDF-1.4"):
            problems.append("25-no-message-id.eml: the PDF was not decoded")
        for tid in (10, 11, 12, 13):
            ticket = s.get(Ticket, tid)
            if ticket is None or not ticket.has_attachment:
                problems.append(f"ticket {tid}: has_attachment is not set")
        for name in ("01-new-ticket-known-person.eml", "13-unknown-sender.eml",
                     "21-html-only.eml"):
            if replayed.attachments(s, name):
                problems.append(f"{name}: has attachments it should not have")
    fail_if(problems)


# --- replay twice ---------------------------------------------------------------------------


def test_second_replay_is_all_duplicates_and_writes_no_ticket_rows(replayed: Replay) -> None:
    models = (Ticket, Message, Attachment, Person, TicketSecondaryPerson)
    with replayed.ingestor.session() as s:
        before = {m.__name__: count(s, m) for m in models}
    problems = []
    for path in MAILS:
        got = ingest_file(replayed.ingestor, path)
        first = replayed.results[path.name]
        if got["Action"] != "duplicate":
            problems.append(f"{path.name}: second run: Action {got['Action']!r} ({got['Reason']})")
        if got["TicketId"] != first["TicketId"]:
            problems.append(
                f"{path.name}: second run: TicketId {got['TicketId']}, first {first['TicketId']}"
            )
    with replayed.ingestor.session() as s:
        after = {m.__name__: count(s, m) for m in models}
        if after != before:
            problems.append(f"rows changed: before {before}, after {after}")
        if count(s, InboundMail) != 2 * len(MAILS):
            problems.append(f"inbound records: {count(s, InboundMail)}, want {2 * len(MAILS)}")
    fail_if(problems)


# --- the command line -----------------------------------------------------------------------


def _cli_replay(db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env["TICKETGATE_DATABASE_URL"] = db
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "replay", str(MAIL_DIR), "--mailbox", "1",
         "--json", "--config", str(CONFIG)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_cli_replay_json_prints_one_ticketinfo_per_mail(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    proc = _cli_replay(db, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(MAILS), proc.stdout
    problems = []
    for path, line in zip(MAILS, lines, strict=True):
        got = json.loads(line)
        TicketInfo.model_validate(got)
        if not set(got) >= TICKETINFO_KEYS:
            problems.append(f"{path.name}: JSON lacks {sorted(TICKETINFO_KEYS - set(got))}")
        problems += mismatches(path.name, got, EXPECTATIONS[path.name])
    first_ids = [json.loads(line)["TicketId"] for line in lines]

    again = _cli_replay(db, tmp_path)
    assert again.returncode == 0, again.stderr
    second = [json.loads(line) for line in again.stdout.splitlines()]
    if [r["Action"] for r in second] != ["duplicate"] * len(MAILS):
        problems.append(f"second CLI run actions: {[r['Action'] for r in second]}")
    if [r["TicketId"] for r in second] != first_ids:
        problems.append("second CLI run: TicketIds differ from the first run")
    fail_if(problems)

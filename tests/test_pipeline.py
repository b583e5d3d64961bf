"""Pipeline behaviour, each case on SQLite and on PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from ingest.models import InboundMail, Message, Person, Ticket, TicketNumberCounter
from ingest.service import Ingestor, RecordedError
from ingest.spool import Envelope
from ingest.tokens import outgoing_message_id
from tests.locks import database_held

CONFIG = """
[service]
base_url = "https://support.example.com"
unknown_sender = "create"
reopen_closed = "{reopen}"

[[associate]]
name = "sarah"
full_name = "Sarah Johnson"
email = "sarah@example.com"
[[associate]]
name = "tom"
full_name = "Tom Baker"
email = "tom@example.com"

[[category]]
name = "Technical Support"
[[category]]
name = "Billing"
[[category]]
name = "Security"
[[priority]]
name = "Medium"
deadline_hours = 24
[[priority]]
name = "High"
deadline_hours = 4

[[contact]]
name = "TechCorp Solutions"
domains = ["techcorp.com"]
[[person]]
first_name = "Michael"
last_name = "Thompson"
email = "michael@techcorp.com"
contact = "TechCorp Solutions"

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
category = "Technical Support"
priority = "Medium"
owner = "sarah"
[[mailbox]]
id = 2
name = "Partners"
addresses = ["partners@example.com"]
unknown_sender = "reject"

[[rule]]
name = "billing"
match = {{ subject = "(?i)invoice|billing" }}
unless = {{ from_domain = "^techcorp\\\\.com$" }}
set = {{ category = "Billing", priority = "High", owner = "tom", tags = ["billing"] }}
[[rule]]
name = "urgent-tag"
match = {{ header = {{ X-Priority = "^1" }} }}
set = {{ tags = ["urgent"] }}
continue = true
[[rule]]
name = "security"
match = {{ body = "(?i)password" }}
set = {{ category = "Security" }}
[[rule]]
name = "blocked"
match = {{ from = "@blocked\\\\.example$" }}
action = "reject"
"""


def mail(
    subject: str = "Printer broken",
    sender: str = "Michael Thompson <michael@techcorp.com>",
    message_id: str | None = "m1@techcorp.com",
    body: str = "Hello, the printer on floor 2 is broken.\n",
    to: str = "support@example.com",
    **headers: str,
) -> bytes:
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}",
             "Date: Tue, 03 Nov 2026 10:00:00 +0100", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8"]
    if message_id:
        lines.append(f"Message-ID: <{message_id}>")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@pytest.fixture
def ing(make_ingestor: Callable[..., Ingestor], tmp_path: Path) -> Ingestor:
    return make_ingestor(CONFIG.format(reopen="reopen"), tmp_path)


def count(ingestor: Ingestor, model: type) -> int:
    with ingestor.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_new_ticket_has_seed_fields_number_deadline_and_utc(ing: Ingestor) -> None:
    info = ing.ingest(mail(), 1)
    assert info.Action == "created"
    assert info.TicketId == 1
    assert info.Title == "Printer broken"
    assert info.OwnerName == "Sarah Johnson"
    assert info.CategoryName == "Technical Support"
    assert info.PriorityName == "Medium"
    assert info.TicketUrl == "https://support.example.com/ticket/1"
    assert info.PersonName == "Michael Thompson"
    assert info.ContactName == "TechCorp Solutions"
    assert info.MessageId == "m1@techcorp.com"
    assert re.fullmatch(r"T\d{8}\.0001", info.TicketNumber or "")
    dump = info.model_dump()
    for key in ("TicketId", "Title", "OwnerName", "CategoryName", "PriorityName", "TicketUrl",
                "PersonName", "ContactName", "TableRight", "FieldProperties"):
        assert key in dump
    with ing.session() as s:
        ticket = s.get(Ticket, 1)
        assert ticket is not None
        assert ticket.created_at.tzinfo is not None
        assert ticket.created_at.utcoffset() == dt.timedelta(0)
        assert ticket.deadline == ticket.created_at + dt.timedelta(hours=24)
        assert info.TicketNumber == "T" + ticket.created_at.strftime("%Y%m%d") + ".0001"
        message = ticket.messages[0]
        assert message.sent_at == dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


def test_ticket_numbers_count_up_per_day(ing: Ingestor) -> None:
    numbers = [ing.ingest(mail(message_id=f"n{i}@x"), 1).TicketNumber for i in range(3)]
    assert [n.rsplit(".", 1)[1] for n in numbers if n] == ["0001", "0002", "0003"]


def test_replay_batches_take_ticket_numbers_without_gaps(ing: Ingestor) -> None:
    """A replay batch takes numbers for all its mails at once and gives back the unused ones
    before it commits: replies, duplicates and ignored mail leave no hole in the sequence."""
    stream = []
    for i in range(12):
        stream.append((mail(f"Case {i}", message_id=f"c{i}@x"), f"new-{i}"))
        stream.append((mail(f"Re: Case {i}", message_id=f"r{i}@x", In_Reply_To=f"<c{i}@x>"),
                       f"reply-{i}"))
        stream.append((mail(f"Case {i}", message_id=f"c{i}@x"), f"again-{i}"))
    results = [info for _s, info in ing.ingest_many(stream, 1, batch_size=10)]
    created = [r.TicketNumber for r in results if not isinstance(r, RecordedError)
               and r.Action == "created"]
    assert len(created) == 12
    after = ing.ingest(mail("Later", message_id="later@x"), 1).TicketNumber
    assert [n.rsplit(".", 1)[1] for n in [*created, after] if n] == [
        f"{n:04d}" for n in range(1, 14)]
    with ing.session() as s:
        assert s.scalar(select(TicketNumberCounter.last)) == 13


def test_duplicate_returns_first_result_and_writes_nothing(ing: Ingestor) -> None:
    first = ing.ingest(mail(), 1)
    again = ing.ingest(mail() + b"\r\n", 1)  # same Message-ID, different bytes
    assert again.Action == "duplicate"
    assert again.TicketId == first.TicketId
    assert again.InboundId != first.InboundId
    assert count(ing, Ticket) == 1
    assert count(ing, Message) == 1
    # The same mail to another mailbox is a different delivery (key = Message-ID + mailbox).
    other = ing.ingest(mail(to="partners@example.com"), 2)
    assert other.Action == "created"


def test_missing_message_id_dedupes_by_content(ing: Ingestor) -> None:
    raw = mail(message_id=None)
    assert ing.ingest(raw, 1).Action == "created"
    assert ing.ingest(raw, 1).Action == "duplicate"
    assert ing.ingest(raw.replace(b"broken", b"fixed"), 1).Action == "created"


def test_threading_evidence_is_recorded(ing: Ingestor) -> None:
    ing.ingest(mail(), 1)
    by_header = ing.ingest(mail("Re: Printer", message_id="m2@techcorp.com",
                                In_Reply_To="<m1@techcorp.com>",
                                References="<m1@techcorp.com>"), 1)
    assert (by_header.Action, by_header.TicketId) == ("appended", 1)
    assert by_header.ThreadedBy == "in-reply-to,references"
    by_number = ing.ingest(mail(f"Re: {by_header.TicketNumber} printer",
                                message_id="m3@techcorp.com"), 1)
    assert (by_number.Action, by_number.ThreadedBy) == ("appended", "ticket-number")
    token = outgoing_message_id(1, ing.settings.service.secret,
                                ing.settings.service.message_id_domain)
    by_token = ing.ingest(mail("Re: your request", sender="someone@elsewhere.example",
                               message_id="m4@elsewhere.example",
                               In_Reply_To=f"<{token}>"), 1)
    assert (by_token.Action, by_token.ThreadedBy) == ("appended", "message-id-token")
    forged = token[:-20] + "0" * 16 + token[-4:]
    forged_info = ing.ingest(mail("Re: your request", sender="x@elsewhere.example",
                                  message_id="m5@elsewhere.example",
                                  In_Reply_To=f"<{forged}>"), 1)
    assert forged_info.Action == "created"
    with ing.session() as s:
        trace = s.get(InboundMail, by_header.InboundId).trace  # type: ignore[union-attr]
    assert any(line["step"] == "thread" and "in-reply-to" in line["note"] for line in trace)


def test_subject_tag_needs_a_sender_the_ticket_knows(ing: Ingestor) -> None:
    ing.ingest(mail(Cc="Peter <peter@partner.example>"), 1)
    stranger = ing.ingest(mail("Re: [#1] give me the data", sender="mallory@evil.example",
                               message_id="s1@evil.example"), 1)
    assert stranger.Action == "created" and stranger.TicketId != 1
    assert stranger.ThreadedBy is None
    assert "subject tag" in (stranger.Reason or "")
    colleague = ing.ingest(mail("Re: [#1] same here", sender="anna@techcorp.com",
                                message_id="s2@techcorp.com"), 1)
    assert (colleague.Action, colleague.TicketId, colleague.ThreadedBy) == (
        "appended", 1, "subject-tag")
    cc_person = ing.ingest(mail("Re: [#1]", sender="peter@partner.example",
                                message_id="s3@partner.example"), 1)
    assert (cc_person.Action, cc_person.TicketId) == ("appended", 1)
    agent = ing.ingest(mail("Re: [#1] fixed", sender="tom@example.com",
                            message_id="s4@example.com"), 1)
    assert (agent.Action, agent.TicketId) == ("appended", 1)


def _close(ing: Ingestor, ticket_id: int) -> None:
    with ing.session() as s:
        ticket = s.get(Ticket, ticket_id)
        assert ticket is not None
        ticket.base_status = "closed"
        ticket.status_id = ing.reference.statuses["Closed"]
        ticket.closed_at = dt.datetime.now(dt.UTC)
        s.commit()


def test_reply_to_closed_ticket_reopens_but_auto_reply_does_not(ing: Ingestor) -> None:
    ing.ingest(mail(), 1)
    _close(ing, 1)
    ooo = ing.ingest(mail("Automatic reply: Printer", message_id="o1@techcorp.com",
                          In_Reply_To="<m1@techcorp.com>", Auto_Submitted="auto-replied"), 1)
    assert (ooo.Action, ooo.TicketId) == ("appended", 1)
    with ing.session() as s:
        assert s.get(Ticket, 1).base_status == "closed"  # type: ignore[union-attr]
        kinds = [m.kind for m in s.get(Ticket, 1).messages]  # type: ignore[union-attr]
    assert kinds == ["normal", "auto-reply"]
    reply = ing.ingest(mail("Re: Printer", message_id="r1@techcorp.com",
                            In_Reply_To="<m1@techcorp.com>"), 1)
    assert (reply.Action, reply.TicketId) == ("appended", 1)
    with ing.session() as s:
        ticket = s.get(Ticket, 1)
        assert ticket is not None
        assert (ticket.base_status, ticket.reopen_count, ticket.closed_at) == ("active", 1, None)


def test_reply_to_closed_ticket_with_policy_new(
    make_ingestor: Callable[..., Ingestor], tmp_path: Path
) -> None:
    ing = make_ingestor(CONFIG.format(reopen="new"), tmp_path)
    ing.ingest(mail(), 1)
    _close(ing, 1)
    reply = ing.ingest(mail("Re: Printer", message_id="r1@techcorp.com",
                            In_Reply_To="<m1@techcorp.com>"), 1)
    assert reply.Action == "created" and reply.TicketId == 2
    with ing.session() as s:
        assert s.get(Ticket, 2).connect_id == 1  # type: ignore[union-attr]
        assert s.get(Ticket, 1).base_status == "closed"  # type: ignore[union-attr]


def test_unknown_sender_policy_per_mailbox(ing: Ingestor) -> None:
    created = ing.ingest(mail(sender='"Doe, Jane" <Jane.Doe@Gmail.example>', message_id="u1@g"), 1)
    assert created.Action == "created" and created.PersonName == "Jane Doe"
    with ing.session() as s:
        assert s.scalar(select(Person).where(Person.email == "jane.doe@gmail.example"))
    refused = ing.ingest(mail(sender="nobody@unknown.example", message_id="u2@g",
                              to="partners@example.com"), 2)
    assert refused.Action == "rejected" and "unknown sender" in (refused.Reason or "")
    known = ing.ingest(mail(message_id="u3@g", to="partners@example.com"), 2)
    assert known.Action == "created"


def test_an_address_longer_than_mail_allows_is_no_person(ing: Ingestor) -> None:
    """A From (or Cc) past RFC 5321's 254 characters: the ticket is made, from an unknown
    sender.  On PostgreSQL the person's insert failed and the mail was quarantined, again at
    every replay."""
    long_from = "a" * 400 + "@customer.example"
    long_cc = "b" * 300 + "@customer.example"
    info = ing.ingest(mail(sender=long_from, message_id="long-from@x", Cc=long_cc), 1)
    assert info.Action == "created", info
    with ing.session() as s:
        emails = list(s.scalars(select(Person.email)))
        message = s.scalars(select(Message)).one()
    assert long_from not in emails and long_cc not in emails
    assert message.from_address == long_from[:320]


def test_company_by_domain_and_secondary_persons(ing: Ingestor) -> None:
    info = ing.ingest(mail(sender="New Person <new@mail.techcorp.com>",
                           Cc="Peter <peter@techcorp.com>, support@example.com"), 1)
    assert info.ContactName == "TechCorp Solutions"
    with ing.session() as s:
        ticket = s.get(Ticket, info.TicketId)
        assert ticket is not None
        assert [p.email for p in ticket.secondary_persons] == ["peter@techcorp.com"]


def test_routing_rules_first_match_continue_unless_and_actions(ing: Ingestor) -> None:
    billing = ing.ingest(mail("Invoice 113 overdue", sender="c@customer.example",
                              message_id="b1@c", X_Priority="1 (Highest)"), 1)
    assert (billing.CategoryName, billing.PriorityName, billing.OwnerName) == (
        "Billing", "High", "Tom Baker")
    with ing.session() as s:
        assert s.get(Ticket, billing.TicketId).tags == ["billing"]  # type: ignore[union-attr]
    exempt = ing.ingest(mail("Invoice question", message_id="b2@techcorp.com"), 1)
    assert exempt.CategoryName == "Technical Support"  # `unless` matched
    urgent = ing.ingest(mail("Cannot log in", sender="c@customer.example", message_id="b3@c",
                             body="My password expired", X_Priority="1"), 1)
    assert urgent.CategoryName == "Security"  # urgent-tag continued to the next rule
    with ing.session() as s:
        assert s.get(Ticket, urgent.TicketId).tags == ["urgent"]  # type: ignore[union-attr]
    blocked = ing.ingest(mail("Hi", sender="x@blocked.example", message_id="b4@c"), 1)
    assert blocked.Action == "rejected" and "blocked" in (blocked.Reason or "")


def test_loops_bulk_and_automatic_mail_never_open_tickets(ing: Ingestor) -> None:
    cases = {
        "own": mail(sender="support@example.com", message_id="l1@x"),
        "xloop": mail(sender="a@b.example", message_id="l2@x", X_Loop="ticketgate"),
        "list": mail(sender="news@list.example", message_id="l3@x", List_Id="<news.list>"),
        "bulk": mail(sender="a@b.example", message_id="l4@x", Precedence="bulk"),
        "ooo": mail("Out of Office: Printer", sender="a@b.example", message_id="l5@x"),
        "auto": mail(sender="a@b.example", message_id="l6@x", Auto_Submitted="auto-generated"),
        "daemon": mail("Undelivered Mail Returned to Sender", sender="MAILER-DAEMON@mx.example",
                       message_id="l7@x", Return_Path="<>"),
    }
    expected = {"own": "loop", "xloop": "loop", "list": "bulk", "bulk": "bulk",
                "ooo": "auto-reply", "auto": "auto-reply", "daemon": "bounce"}
    for name, raw in cases.items():
        info = ing.ingest(raw, 1)
        assert info.Action == "ignored", name
        assert (info.Reason or "").startswith(expected[name]), (name, info.Reason)
    assert count(ing, Ticket) == 0


def test_garbage_is_recorded_as_rejected_and_raised(ing: Ingestor) -> None:
    for data in (b"", b"\x00\x01\x02 binary", b"just some words without headers"):
        with pytest.raises(RecordedError) as caught:
            ing.ingest(data, 1)
        with ing.session() as s:
            row = s.get(InboundMail, caught.value.inbound_id)
            assert row is not None and row.state == "rejected" and row.reason
    with pytest.raises(RecordedError, match="no mailbox"):
        ing.ingest(mail(), 99)


def test_empty_message_is_ignored_not_a_ticket(ing: Ingestor) -> None:
    """An empty SMTP DATA arrives as the listener's Received header alone."""
    raw = (b"Received: from client.example.org (127.0.0.1) by mx;"
           b" Sun, 22 Nov 2026 14:00:00 +0000\r\n")
    inbound_id = ing.receive(raw, 1, "smtp", envelope=Envelope(
        mail_from="a@example.org", rcpt_to=["support@example.com"]))
    info = ing.process(inbound_id)
    assert info.Action == "ignored" and (info.Reason or "").startswith("empty message")
    assert count(ing, Ticket) == 0
    assert ing.ingest(mail(body=""), 1).Action == "created"  # headers but no body: a mail


def test_failure_is_quarantined_and_replayable(
    ing: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingest.steps.routing as routing

    def broken(ctx: object) -> None:
        raise RuntimeError("routing exploded")

    monkeypatch.setattr("ingest.pipeline.STEPS", tuple(
        broken if step is routing.route else step for step in __import__(
            "ingest.pipeline", fromlist=["STEPS"]).STEPS))
    info = ing.ingest(mail(), 1)
    assert info.Action == "quarantined" and "routing exploded" in (info.Reason or "")
    with ing.session() as s:
        row = s.get(InboundMail, info.InboundId)
        assert row is not None and row.state == "quarantined" and row.raw == mail()
        assert row.trace[-1]["step"] == "quarantine"
        assert [line["step"] for line in row.trace][:3] == ["dedupe", "limits", "parse"]
    assert count(ing, Ticket) == 0
    monkeypatch.undo()
    again = ing.replay_quarantined(info.InboundId or 0)
    assert again.Action == "created" and again.InboundId == info.InboundId
    assert ing.ingest(mail(), 1).Action == "duplicate"


def test_ingest_many_commits_batches_and_keeps_order(ing: Ingestor) -> None:
    """A batch behaves as the same mails ingested one by one: a reply finds the ticket its
    parent opened earlier in the same batch, a second delivery inside the batch is a duplicate,
    refused input is recorded, and results come back in input order."""
    stream = [
        (mail(message_id="b1@techcorp.com"), "one"),
        (b"no headers at all", "garbage"),
        (mail("Re: Printer broken", message_id="b2@techcorp.com",
              In_Reply_To="<b1@techcorp.com>"), "reply"),
        (mail(message_id="b1@techcorp.com"), "again"),
        (mail("Scanner", message_id="b3@techcorp.com"), "two"),
    ]
    results = list(ing.ingest_many(stream, 1, batch_size=3))
    assert [label for label, _ in results] == ["one", "garbage", "reply", "again", "two"]
    first, garbage, reply, again, second = (r for _, r in results)
    assert isinstance(garbage, RecordedError) and garbage.info.Action == "rejected"
    assert not isinstance(first, RecordedError) and first.Action == "created"
    assert not isinstance(reply, RecordedError)
    assert reply.Action == "appended" and reply.TicketId == first.TicketId
    assert reply.ThreadedBy == "in-reply-to"
    assert not isinstance(again, RecordedError) and again.Action == "duplicate"
    assert not isinstance(second, RecordedError) and second.Action == "created"
    assert count(ing, Ticket) == 2 and count(ing, Message) == 3


def test_ingest_many_quarantines_the_mail_at_fault_and_keeps_the_batch(
    ing: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingest.steps.routing as routing

    def broken_on_scanner(ctx: object) -> None:
        if "Scanner" in ctx.mail.subject:  # type: ignore[attr-defined]
            raise RuntimeError("routing exploded")
        return routing.route(ctx)  # type: ignore[arg-type]

    monkeypatch.setattr("ingest.pipeline.STEPS", tuple(
        broken_on_scanner if step is routing.route else step for step in __import__(
            "ingest.pipeline", fromlist=["STEPS"]).STEPS))
    stream = [(mail(message_id=f"q{i}@techcorp.com", subject=subject), subject)
              for i, subject in enumerate(["Printer", "Scanner", "Fax"])]
    actions = {label: (r.info if isinstance(r, RecordedError) else r).Action
               for label, r in ing.ingest_many(stream, 1)}
    assert actions == {"Printer": "created", "Scanner": "quarantined", "Fax": "created"}
    with ing.session() as s:
        states = sorted(s.scalars(select(InboundMail.state)))
    assert states == ["created", "created", "quarantined"]


def test_process_is_idempotent_for_spooled_records(ing: Ingestor) -> None:
    inbound_id = ing.receive(mail(), 1, door="smtp")
    first = ing.process(inbound_id)
    second = ing.process(inbound_id)
    assert first == second and first.Action == "created"
    assert count(ing, Message) == 1


@pytest.mark.parametrize("together", [1, 3], ids=["alone", "batch"])
def test_spooled_mail_is_parsed_outside_its_transaction(
        ing: Ingestor, monkeypatch: pytest.MonkeyPatch, together: int) -> None:
    """A mail is parsed before its transaction opens, alone or in a worker's batch.  On SQLite
    a parse inside held the one write lock, and the listener's spool writes waited; on
    PostgreSQL it held the rows, claim locks and a pooled connection."""
    import ingest.pipeline as pipeline
    import ingest.prepare as prepare

    ids = [ing.receive(mail(subject=f"Printer {n}", message_id=f"m{n}@techcorp.com"), 1,
                       door="smtp") for n in range(together)]
    held_during_parse: list[bool] = []
    real_parse = prepare.prepare_mail

    def parse_watched(raw: bytes, max_bytes: int) -> object:
        held_during_parse.append(database_held(ing))
        return real_parse(raw, max_bytes)

    monkeypatch.setattr(prepare, "prepare_mail", parse_watched)  # a mail alone
    monkeypatch.setattr(pipeline, "prepare_mail", parse_watched)  # a batch
    results = ing.process_many(ids)
    assert sorted(info.Action for info in results.infos.values()) == ["created"] * together
    assert held_during_parse == [False] * together
    with ing.session() as s:
        assert set(s.scalars(select(InboundMail.state))) == {"created"}


class _WorkerDied(BaseException):
    """Stands in for a worker killed in the middle of a mail (out of memory, a time limit)."""


def test_a_mail_that_kills_its_worker_while_prepared_is_quarantined(
        ing: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every start is counted before the mail is parsed and its sender's evidence looked up,
    and checked before that work begins: a mail that kills its worker there (a parser or DKIM
    crash, a time limit) is quarantined on its start after ``max_attempts``, not parsed again."""
    import ingest.pipeline as pipeline

    inbound_id = ing.receive(mail(), 1, door="smtp")
    prepared: list[int] = []

    def dies(*_args: object) -> object:
        prepared.append(inbound_id)
        raise _WorkerDied

    monkeypatch.setattr(pipeline, "prepare_delivery", dies)
    max_attempts = ing.settings.worker.max_attempts
    for _delivery in range(max_attempts):
        with pytest.raises(_WorkerDied):
            ing.process(inbound_id)
    info = ing.process(inbound_id)
    assert info.Action == "quarantined" and "worker died or hung" in (info.Reason or "")
    assert len(prepared) == max_attempts


def test_concurrent_deliveries_of_one_mail_make_one_ticket(ing: Ingestor) -> None:
    """Eight workers race on the same Message-ID and the same new sender."""
    ids = [ing.receive(mail(sender="Racer <racer@new.example>"), 1, door="smtp")
           for _ in range(8)]
    results: list[str] = []
    errors: list[BaseException] = []

    def work(inbound_id: int) -> None:
        try:
            results.append(ing.process(inbound_id).Action)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == ["created"] + ["duplicate"] * 7
    assert count(ing, Ticket) == 1
    assert count(ing, Person) == 2  # the configured Michael and the racer, once


def test_reply_waits_for_its_spooled_parent(ing: Ingestor) -> None:
    """A worker that meets a reply before its parent defers it instead of splitting the thread."""
    from ingest.errors import ParentPending

    parent = ing.receive(mail(), 1, door="smtp")
    reply = ing.receive(mail("Re: Printer broken", message_id="m2@techcorp.com",
                             In_Reply_To="<m1@techcorp.com>"), 1, door="smtp")
    with pytest.raises(ParentPending):
        ing.process(reply)
    with ing.session() as s:
        assert s.get(InboundMail, reply).state == "received"  # type: ignore[union-attr]
        assert s.get(InboundMail, reply).attempts == 0  # type: ignore[union-attr]
    assert ing.process(parent).Action == "created"
    threaded = ing.process(reply)
    assert (threaded.Action, threaded.TicketId, threaded.ThreadedBy) == ("appended", 1,
                                                                        "in-reply-to")
    # In-process callers (replay, HTTP) never defer: nothing else would process the parent.
    assert ing.ingest(mail("Re: x", message_id="m9@techcorp.com",
                           In_Reply_To="<never-seen@x>"), 1).Action == "created"


def test_mail_that_keeps_killing_its_worker_is_quarantined(ing: Ingestor) -> None:
    inbound_id = ing.receive(mail(), 1, door="smtp")
    with ing.session() as s:  # as if five workers died while processing it
        row = s.get(InboundMail, inbound_id)
        assert row is not None
        row.attempts = ing.settings.worker.max_attempts
        s.commit()
    info = ing.process(inbound_id)
    assert info.Action == "quarantined" and "without finishing" in (info.Reason or "")
    assert count(ing, Ticket) == 0
    assert ing.replay_quarantined(inbound_id).Action == "created"


def test_sweep_hands_each_stuck_mail_off_once_per_age(ing: Ingestor) -> None:
    stuck = ing.receive(mail(), 1, door="smtp")
    with ing.session() as s:
        row = s.get(InboundMail, stuck)
        assert row is not None
        row.enqueued_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        s.commit()
    fresh = ing.receive(mail(message_id="fresh@x"), 1, door="smtp")
    assert ing.stuck_inbound_ids(60) == [stuck]
    assert ing.stuck_inbound_ids(60) == []  # just handed off again
    ing.process(stuck)
    later = ing.stuck_inbound_ids(0.0)
    assert stuck not in later and fresh in later  # processed mail is never swept


def test_envelope_recipient_of_a_catch_all_mailbox_is_not_a_person(
    make_ingestor: Callable[..., Ingestor],
) -> None:
    from ingest.spool import Envelope

    ing = make_ingestor()  # the demo set-up: mailbox 1 accepts any recipient
    inbound_id = ing.receive(mail(to="help@anything.example", Cc="peter@techcorp.com"), 1,
                             door="smtp", envelope=Envelope(rcpt_to=["help@anything.example"]))
    info = ing.process(inbound_id)
    with ing.session() as s:
        ticket = s.get(Ticket, info.TicketId)
        assert ticket is not None
        assert [p.email for p in ticket.secondary_persons] == ["peter@techcorp.com"]


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9._%+'-]{1,20}@[A-Za-z0-9-]{1,12}(\.[A-Za-z0-9-]{1,8}){1,3}",
                     fullmatch=True), st.sampled_from(["", " ", "\t"]))
def test_plain_addresses_normalize_as_parseaddr_does(address: str, pad: str) -> None:
    """normalize_address lowers a plain local@domain without parseaddr; the answer must be
    the one parseaddr gives."""
    from email.utils import parseaddr

    from ingest.steps.sender import normalize_address

    _name, bare = parseaddr(pad + address + pad)
    assert normalize_address(pad + address + pad) == (bare or address).strip().strip("<>").lower()

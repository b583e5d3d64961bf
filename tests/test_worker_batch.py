"""A worker task's ids in one transaction (``pipeline.process_inbound_many``): same results as
one by one, poison mail isolated, a failed batch redone one by one, replies that wait for a
parent outside the batch deferred without counting an attempt.  Each test runs on SQLite and
on PostgreSQL; ``max_attempts = 1`` turns batches off (``pipeline._batches``) where a test
compares with one by one."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text, update

from ingest import pipeline
from ingest.config import load_settings
from ingest.context import MailContext, Outcome
from ingest.models import InboundMail, Message, Ticket
from ingest.service import Ingestor
from ingest.steps import circuit_breaker
from ingest.ticketinfo import TicketInfo
from tests.test_pipeline import CONFIG, count, mail


@pytest.fixture
def ing(make_ingestor: Callable[..., Ingestor], tmp_path: Path) -> Ingestor:
    return make_ingestor(CONFIG.format(reopen="reopen"), tmp_path)


def spool(ing: Ingestor, *raws: bytes) -> list[int]:
    return [ing.receive(raw, 1, "smtp") for raw in raws]


def records(ing: Ingestor, ids: list[int]) -> dict[int, tuple[str, int, int | None]]:
    with ing.session() as s:
        rows = s.execute(select(InboundMail.id, InboundMail.state, InboundMail.attempts,
                                InboundMail.ticket_message_id)
                         .where(InboundMail.id.in_(ids))).all()
    return {row.id: (row.state, row.attempts, row.ticket_message_id) for row in rows}


def test_a_batch_gives_what_one_by_one_gives(make_ingestor: Callable[..., Ingestor],
                                             tmp_path: Path) -> None:
    stream = [
        mail("Printer broken", message_id="p1@techcorp.com"),
        mail("Re: Printer broken", message_id="p2@techcorp.com",
             In_Reply_To="<p1@techcorp.com>"),  # its parent is earlier in the same batch
        mail("Invoice missing", sender="Ann <ann@shop.example>", message_id="i1@shop.example"),
        mail("Printer broken", message_id="p1@techcorp.com"),  # a second delivery
        mail("Spam", sender="x@blocked.example", message_id="s1@blocked.example"),
    ]
    batched = make_ingestor(CONFIG.format(reopen="reopen"), tmp_path)
    ids = spool(batched, *stream)
    results = batched.process_many(ids)
    config = tmp_path / "one-by-one.toml"
    config.write_text(CONFIG.format(reopen="reopen"), encoding="utf-8")
    single = Ingestor(load_settings(config, database_url=f"sqlite:///{tmp_path / 'one.db'}"))
    try:
        one_by_one = [single.process(i) for i in spool(single, *stream)]
    finally:
        single.close()

    def summary(info: object) -> tuple[object, ...]:
        return tuple(getattr(info, f) for f in (
            "Action", "TicketId", "Title", "OwnerName", "CategoryName", "PersonName", "Reason"))

    assert [summary(results.infos[i]) for i in ids] == [summary(i) for i in one_by_one]
    assert [results.infos[i].Action for i in ids] == [
        "created", "appended", "created", "duplicate", "rejected"]
    assert results.deferred == [] and results.missing == []
    stored = records(batched, ids)
    assert [stored[i][:2] for i in ids] == [
        ("created", 1), ("appended", 1), ("created", 1), ("duplicate", 1), ("rejected", 1)]
    with batched.session() as s:  # the message rows the batch wrote at its end are linked
        linked = {i: s.get(Message, stored[i][2]) for i in ids[:3]}
        assert [m.message_id for m in linked.values() if m] == [
            "p1@techcorp.com", "p2@techcorp.com", "i1@shop.example"]
        ticket = s.get(Ticket, results.infos[ids[0]].TicketId)
        assert ticket is not None and ticket.num_messages == 2


def test_a_reply_whose_parent_is_outside_the_task_waits_without_an_attempt(ing: Ingestor
                                                                           ) -> None:
    parent, reply, other = spool(ing, mail("Printer broken", message_id="p1@techcorp.com"),
                                 mail("Re: Printer broken", message_id="p2@techcorp.com",
                                      In_Reply_To="<p1@techcorp.com>"),
                                 mail("Other", message_id="o1@techcorp.com"))
    results = ing.process_many([reply, other])
    assert results.deferred == [reply]
    assert results.infos[other].Action == "created"
    assert records(ing, [reply])[reply][:2] == ("received", 0)
    ing.process(parent)
    assert ing.process_many([reply]).infos[reply].Action == "appended"


def test_a_deferred_reply_waits_in_the_task_until_its_parent_is_done(ing: Ingestor) -> None:
    """The parent is in progress elsewhere (another worker, here a thread 0.3 s later): the
    task waits for it and appends the reply itself instead of handing it back."""
    parent, reply = spool(ing, mail("Printer broken", message_id="p1@techcorp.com"),
                          mail("Re: Printer broken", message_id="p2@techcorp.com",
                               In_Reply_To="<p1@techcorp.com>"))
    elsewhere = threading.Timer(0.3, ing.process, args=(parent,))
    elsewhere.start()
    started = time.monotonic()
    results = ing.process_many([reply], parent_wait=30)
    elsewhere.join()
    assert results.deferred == [] and results.infos[reply].Action == "appended"
    assert time.monotonic() - started < 10  # it went on once the parent was done
    assert records(ing, [reply])[reply][:2] == ("appended", 1)


def test_a_deferred_reply_is_handed_back_when_its_parent_stays_spooled(ing: Ingestor) -> None:
    parent, reply = spool(ing, mail("Printer broken", message_id="p1@techcorp.com"),
                          mail("Re: Printer broken", message_id="p2@techcorp.com",
                               In_Reply_To="<p1@techcorp.com>"))
    started = time.monotonic()
    results = ing.process_many([reply], parent_wait=0.3)
    assert time.monotonic() - started >= 0.25
    assert results.deferred == [reply] and results.parents == {reply: parent}
    assert records(ing, [reply])[reply][:2] == ("received", 0)


def test_a_reply_to_a_deferred_reply_of_the_same_task_does_not_wait_on_it(ing: Ingestor
                                                                           ) -> None:
    """R2 answers R1, R1 answers P; P is in progress elsewhere.  The task waits for P only (R1
    is its own to run again), then appends both."""
    parent, first, second = spool(
        ing, mail("Printer broken", message_id="p1@techcorp.com"),
        mail("Re: Printer broken", message_id="p2@techcorp.com", In_Reply_To="<p1@techcorp.com>"),
        mail("Re: Re: Printer broken", message_id="p3@techcorp.com",
             In_Reply_To="<p2@techcorp.com>"))
    elsewhere = threading.Timer(0.3, ing.process, args=(parent,))
    elsewhere.start()
    results = ing.process_many([first, second], parent_wait=30)
    elsewhere.join()
    assert results.deferred == []
    assert [results.infos[i].Action for i in (first, second)] == ["appended", "appended"]


def test_a_batch_that_loses_a_deadlock_is_redone_at_once(fresh_postgres_url: str,
                                                         tmp_path: Path) -> None:
    """PostgreSQL breaks a lock cycle by aborting one transaction (SQLSTATE 40P01).  Here the
    batch holds its inbound rows and waits for the ticket-number counter, which the test holds
    while it asks for those rows: the batch is the victim, and it is redone one by one in the
    same call instead of going back to the broker as a failure."""
    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(reopen="reopen"), encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    ing.process(spool(ing, mail("First", message_id="f@x"))[0])  # today's counter row exists
    ids = spool(ing, mail("A", message_id="a@x"), mail("B", message_id="b@x"))
    other = create_engine(fresh_postgres_url).connect()
    try:
        other.execute(text("SET deadlock_timeout = '5s'"))  # so the batch is the one to detect
        other.execute(text("SELECT last FROM ticket_number_counters FOR UPDATE"))
        outcome: dict[str, object] = {}
        batch = threading.Thread(target=lambda: outcome.update(r=ing.process_many(ids)))
        batch.start()
        time.sleep(0.5)  # the batch has its rows and waits for the counter
        other.execute(text("SELECT id FROM inbound_mails WHERE id = ANY(:ids) FOR UPDATE"),
                      {"ids": ids})  # waits for the batch until PostgreSQL aborts it
        other.commit()
        batch.join(30)
    finally:
        other.close()
        ing.close()
    results = outcome["r"]
    assert isinstance(results, pipeline.SpooledResults)
    assert [results.infos[i].Action for i in ids] == ["created", "created"]
    assert [records(ing, ids)[i][:2] for i in ids] == [("created", 1), ("created", 1)]


def test_mail_started_before_goes_one_by_one(ing: Ingestor) -> None:
    """A worker died on this task once: every record of it was started, so each now runs on
    its own and a poison mail cannot take the others down with it again."""
    ids = spool(ing, mail("A", message_id="a@x"), mail("B", message_id="b@x"))
    with ing.session() as s:
        s.execute(update(InboundMail).where(InboundMail.id.in_(ids)).values(attempts=1))
        s.commit()
    results = ing.process_many(ids)
    assert [results.infos[i].Action for i in ids] == ["created", "created"]
    assert [records(ing, ids)[i][:2] for i in ids] == [("created", 2), ("created", 2)]


@pytest.fixture
def failing_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A pipeline step that raises on one mail, as a bug meeting a strange mail would."""

    def explode(ctx: MailContext) -> Outcome | None:
        if ctx.mail.subject == "boom":
            raise ValueError("boom")
        return None

    monkeypatch.setattr(pipeline, "STEPS", (*pipeline.STEPS, explode))
    yield


@pytest.mark.usefixtures("failing_step")
def test_a_failed_batch_is_redone_one_by_one_and_only_the_culprit_is_quarantined(
        ing: Ingestor) -> None:
    ids = spool(ing, mail("A", message_id="a@x"), mail("boom", message_id="b@x"),
                mail("C", message_id="c@x"))
    results = ing.process_many(ids)
    assert [results.infos[i].Action for i in ids] == ["created", "quarantined", "created"]
    assert "ValueError: boom" in (results.infos[ids[1]].Reason or "")
    # the batch's start was taken back: each record counts the one start that finished it
    assert [records(ing, ids)[i][:2] for i in ids] == [
        ("created", 1), ("quarantined", 1), ("created", 1)]
    assert count(ing, Ticket) == 2


def test_no_batch_of_one_nor_with_a_single_attempt(make_ingestor: Callable[..., Ingestor],
                                                   tmp_path: Path) -> None:
    """With max_attempts = 1 a worker dying in a batch would exhaust every mail of it."""
    ing = make_ingestor(CONFIG.format(reopen="reopen"), tmp_path)
    assert pipeline._batches(ing, [1, 2])
    assert not pipeline._batches(ing, [1])
    single = make_ingestor(CONFIG.format(reopen="reopen") + "\n[worker]\nmax_attempts = 1\n",
                           tmp_path)
    assert not pipeline._batches(single, [1, 2])


def test_the_deadline_leaves_the_rest_for_another_task(ing: Ingestor) -> None:
    ids = spool(ing, mail("A", message_id="a@x"), mail("B", message_id="b@x"))
    with ing.session() as s:  # not fresh, so they run one by one, where the deadline applies
        s.execute(update(InboundMail).where(InboundMail.id.in_(ids)).values(attempts=1))
        s.commit()
    results = ing.process_many(ids, deadline=0.0)
    assert results.infos == {} and results.left == ids
    assert [records(ing, ids)[i][:2] for i in ids] == [("received", 1), ("received", 1)]


def each_parse_takes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The pipeline's clock becomes the test's, starting at 0, and each parse of a batch takes
    ``seconds`` of it: deadlines are met or missed by construction, however loaded the
    machine."""
    clock = [0.0]
    monkeypatch.setattr(pipeline, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                          sleep=time.sleep))
    real_parse = pipeline.prepare_mail

    def slow_parse(*args: Any) -> object:
        clock[0] += seconds
        return real_parse(*args)

    monkeypatch.setattr(pipeline, "prepare_mail", slow_parse)


def test_a_batch_begins_no_preparation_after_the_deadline(
        ing: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's mails are parsed before its transaction, one after the other (a huge mail
    takes seconds), then their senders' DNS is looked up side by side.  No parse is begun after
    the task's deadline: the rest are handed back uncounted.  (The pipeline's clock is the
    test's: each parse takes ten of its seconds.)"""
    ids = spool(ing, *(mail(f"Slow {n}", message_id=f"slow{n}@x") for n in range(3)))
    each_parse_takes(monkeypatch, 10.0)  # as a huge mail's
    results = ing.process_many(ids, deadline=5.0)
    assert [info.Action for info in results.infos.values()] == ["created"]
    assert results.left == ids[1:]
    state = records(ing, ids)
    assert state[ids[0]][:2] == ("created", 1)
    assert [state[i][:2] for i in ids[1:]] == [("received", 0), ("received", 0)]


def test_a_batch_that_fails_past_the_deadline_leaves_its_mails_started(
        ing: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fails once the deadline has passed hands its mails back with their starts
    counted: the next task runs them one by one, which isolates the mail at fault, instead of
    preparing and failing the same batch again (and again, if preparing takes the deadline)."""
    ids = spool(ing, *(mail(f"Late {n}", message_id=f"late{n}@x") for n in range(2)))
    each_parse_takes(monkeypatch, 3.0)  # both begun before the deadline, past after the second

    def failing_write(*_args: Any) -> None:
        raise RuntimeError("a mail the batch cannot write")

    monkeypatch.setattr(pipeline, "_write_batch", failing_write)
    results = ing.process_many(ids, deadline=5.0)
    assert results.infos == {} and results.left == ids
    assert [records(ing, ids)[i][:2] for i in ids] == [("received", 1), ("received", 1)]


def test_a_person_another_transaction_creates_meanwhile_is_taken_not_fatal(
        fresh_postgres_url: str, tmp_path: Path) -> None:
    """Two workers' batches meet the same new sender: the second insert waits for the first
    transaction, then takes its row; its own transaction (the rest of its batch) goes on."""
    from ingest.steps.sender import find_or_create_person

    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(reopen="reopen"), encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    try:
        with ing.session() as first, ing.session() as second:
            mine, created = find_or_create_person(first, "new@shop.example", "New Person", True)
            assert created and mine is not None
            found: dict[str, object] = {}
            racer = threading.Thread(target=lambda: found.update(r=find_or_create_person(
                second, "new@shop.example", "New Person", True)))
            racer.start()
            time.sleep(0.3)  # the second insert now waits for the first transaction
            first.commit()
            racer.join(10)
            theirs, created_again = found["r"]  # type: ignore[misc]
            assert not created_again and theirs.id == mine.id
            second.commit()  # the second transaction is still usable
    finally:
        ing.close()


def report(n: int, sender: str = "reports@erp.test") -> tuple[bytes, str]:
    """The same automatic-looking report again and again (no RFC 3834 headers)."""
    return mail("Nightly report", sender=f"ERP <{sender}>",
                message_id=f"report-{n}@erp.test"), f"INBOX:{n}"


def count_statements(ing: Ingestor, marker: str) -> Callable[[], int]:
    """How many statements containing ``marker`` the ingestor's engine runs from now on."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if marker in statement:
            seen.append(statement)

    event.listen(ing.engine, "before_cursor_execute", note)
    return lambda: len(seen)


@pytest.mark.parametrize("way", ["read-ahead", "too-many-rows", "one-by-one"])
def test_the_breaker_counts_a_batch_by_each_mails_own_window(
        make_ingestor: Callable[..., Ingestor], tmp_path: Path, way: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker batch reads the messages its breaker checks count once (the circuit breaker's
    ``read_window``) and counts each mail over its own hour: the stored messages of the window
    plus the batch's own, none outside it.  Arrival minutes 0-3 and 70-73 are two bursts, 125
    and 131 see part of the second; one by one (no batches with ``max_attempts = 1``) gives the
    same, and so does a batch whose window holds more rows than it keeps (each mail then
    asks)."""
    if way == "too-many-rows":
        monkeypatch.setattr(circuit_breaker, "WINDOW_MAX_ROWS", 0)
    one_by_one = "\n[worker]\nmax_attempts = 1\n" if way == "one-by-one" else ""
    ing = make_ingestor(CONFIG.format(reopen="reopen") + one_by_one
                        + '\n[limits]\nper_sender_subject_max = 3\ndoors = ["imap"]\n', tmp_path)
    start = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)
    minutes = [0, 1, 2, 3, 70, 71, 72, 73, 125, 131]
    spooled = ing.receive_batch([report(n) for n in range(len(minutes))], 1, "imap",
                                arrived=[start + dt.timedelta(minutes=m) for m in minutes])
    ids = [s.inbound_id for s in spooled]
    counted = count_statements(ing, "FILTER (WHERE")
    first = ing.process_many(ids[:5])  # written before the second batch reads its window
    second = ing.process_many(ids[5:])
    actions = [{**first.infos, **second.infos}[i].Action for i in ids]
    assert actions == ["created"] * 3 + ["quarantined"] + ["created"] * 3 + ["quarantined"] + [
        "quarantined", "created"]
    # Batches count from what they read ahead; one by one, each mail asks, and so does each
    # mail of a batch whose window was too big to keep (the second here).
    expected = {"read-ahead": 0, "too-many-rows": len(ids[5:]), "one-by-one": len(ids)}
    assert counted() == expected[way]


def test_a_batch_asks_per_batch_not_per_mail(fresh_postgres_url: str, tmp_path: Path) -> None:
    """What the steps of a worker batch's replies look up (their parents still spooled, the
    tickets of the Message-IDs they answer, the breaker's counts) is read once per batch: a
    batch of 12 replies runs as many statements as a batch of 3.  (Batches are PostgreSQL's.)"""
    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(reopen="reopen"), encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    try:
        _replies_in_two_batches(ing)
    finally:
        ing.close()


def _replies_in_two_batches(ing: Ingestor) -> None:
    parents = spool(ing, *(mail(f"Question {n}", sender=f"Person {n} <p{n}@techcorp.com>",
                                message_id=f"q{n}@techcorp.com") for n in range(15)))
    assert {info.Action for info in ing.process_many(parents).infos.values()} == {"created"}
    statements: list[int] = []
    for replies in (range(3), range(3, 15)):
        ids = spool(ing, *(mail(f"Re: Question {n}", sender=f"Person {n} <p{n}@techcorp.com>",
                                message_id=f"r{n}@techcorp.com", In_Reply_To=f"<q{n}@techcorp.com>")
                           for n in replies))
        counted = count_statements(ing, "")
        results = ing.process_many(ids)
        statements.append(counted())
        assert {info.Action for info in results.infos.values()} == {"appended"}
    assert statements[0] == statements[1], statements


def test_a_reply_to_a_ticket_of_its_own_batch_counts_without_a_query(
        fresh_postgres_url: str, tmp_path: Path) -> None:
    """A ticket the batch creates has no stored messages: the breaker's per-ticket count of a
    reply to it later in the batch needs no query (and still counts the batch's own)."""
    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(reopen="reopen") + "\n[limits]\nper_ticket_max = 2\n",
                      encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    try:
        ids = spool(ing, mail("Printer broken", message_id="p1@techcorp.com"), *(
            mail("Re: Printer broken", message_id=f"p{n}@techcorp.com",
                 In_Reply_To="<p1@techcorp.com>") for n in (2, 3)))
        counted = count_statements(ing, "FILTER (WHERE")
        results = ing.process_many(ids)
        assert [results.infos[i].Action for i in ids] == ["created", "appended", "quarantined"]
        assert counted() == 0
    finally:
        ing.close()


@pytest.fixture
def pg_ing(fresh_postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
           ) -> Iterator[Ingestor]:
    """An Ingestor on a fresh PostgreSQL database (batches are PostgreSQL's), with the
    pipeline's INFO lines captured: a batch rolled back and redone one by one says so there."""
    caplog.set_level(logging.INFO, logger="ticketgate.pipeline")
    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(reopen="reopen"), encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    yield ing
    ing.close()


def overlapping_batches(ing: Ingestor, monkeypatch: pytest.MonkeyPatch, earlier: list[int],
                        later: list[int], pause_at: int, head_start: float = 0.3
                        ) -> dict[int, TicketInfo]:
    """Run ``earlier`` in a thread, paused for a second before the steps of ``pause_at``, and
    ``later`` meanwhile (as two workers would); every mail's TicketInfo."""

    def pause(ctx: MailContext) -> Outcome | None:
        if ctx.inbound.id == pause_at:
            time.sleep(1.0)  # the later batch runs meanwhile
        return None

    monkeypatch.setattr(pipeline, "STEPS", (pause, *pipeline.STEPS))
    results: dict[str, pipeline.SpooledResults] = {}
    thread = threading.Thread(target=lambda: results.update(a=ing.process_many(earlier)))
    thread.start()
    time.sleep(head_start)
    results["b"] = ing.process_many(later)
    thread.join(30)
    return {**results["a"].infos, **results["b"].infos}


@pytest.mark.parametrize("first_alone", [False, True], ids=["batch", "one-by-one"])
def test_two_deliveries_in_two_concurrent_batches_cost_no_rollback(
        pg_ing: Ingestor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        first_alone: bool) -> None:
    """An MTA delivers a mail twice and each copy lands in another worker's batch at the same
    moment.  The second batch waits for the first (``dedupe.lock_claims``), then finds the first
    delivery's claim: a duplicate like any other, and its other mails stay in the batch (before,
    its final write hit the unique claim and the whole batch was redone one by one).  The same
    when the first copy is processed on its own (a task's deferred reply run again)."""
    ing = pg_ing
    first, one = spool(ing, mail("Printer broken", message_id="twice@x"),
                       mail("One", message_id="one@x"))
    second, two = spool(ing, mail("Printer broken", message_id="twice@x"),
                        mail("Two", message_id="two@x"))
    infos = overlapping_batches(ing, monkeypatch, [first] if first_alone else [first, one],
                                [second, two], pause_at=first)
    assert [infos[i].Action for i in (first, second, two)] == ["created", "duplicate", "created"]
    assert infos[second].TicketId == infos[first].TicketId
    assert "one by one" not in caplog.text


def test_two_batches_meeting_the_same_new_sender_do_not_deadlock(
        pg_ing: Ingestor, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A batch numbers its new tickets at its end (``store.number_tickets``).  When it took the
    numbers at its first new ticket, the earlier batch here held the counter while it waited to
    insert a new sender that the later batch had just inserted, and the later batch waited for
    the counter: PostgreSQL broke the cycle after a second by rolling one batch back."""
    ing = pg_ing
    new_sender = "New Sender <new@newcorp.example>"
    ing.process(spool(ing, mail("Earlier today", message_id="t@x"))[0])  # the counter row
    b1, b2 = spool(ing, mail("Earlier one", message_id="b1@x"),
                   mail("Earlier two", sender=new_sender, message_id="b2@x"))
    a1, a2 = spool(ing, mail("Later one", sender=new_sender, message_id="a1@x"),
                   mail("Later two", message_id="a2@x"))
    infos = overlapping_batches(ing, monkeypatch, [b1, b2], [a1, a2], pause_at=b2,
                                head_start=0.4)
    with ing.session() as s:
        persons = s.scalar(text("SELECT count(*) FROM persons WHERE email = :email"),
                           {"email": "new@newcorp.example"})
    assert [infos[i].Action for i in (b1, b2, a1, a2)] == ["created"] * 4
    assert persons == 1
    assert "one by one" not in caplog.text and "deadlock" not in caplog.text


def test_a_batch_numbers_its_tickets_at_its_end_everywhere_they_are_named(ing: Ingestor) -> None:
    """New tickets get their numbers when the batch ends; the TicketInfo returned, the result
    stored on each record (a reply's and a second delivery's too) and the store step's trace
    line all name the number, never the placeholder, and the day's sequence has no gap."""
    ing.process(spool(ing, mail("Earlier", message_id="e@x"))[0])  # number 1 of the day
    ids = spool(ing,
                mail("Printer broken", message_id="p1@x"),
                mail("Re: Printer broken", message_id="p2@x", In_Reply_To="<p1@x>"),
                mail("Printer broken", message_id="p1@x"),  # a second delivery
                mail("Invoice missing", sender="Ann <ann@shop.example>", message_id="i1@x"))
    results = ing.process_many(ids)
    infos = [results.infos[i] for i in ids]
    assert [i.Action for i in infos] == ["created", "appended", "duplicate", "created"]
    day = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    assert [i.TicketNumber for i in infos] == [f"T{day}.0002"] * 3 + [f"T{day}.0003"]
    with ing.session() as s:
        rows = s.execute(select(InboundMail.id, InboundMail.result, InboundMail.trace)
                         .where(InboundMail.id.in_(ids)).order_by(InboundMail.id)).all()
        numbers = dict(s.execute(select(Ticket.id, Ticket.ticket_number)).all())
    assert [row.result["TicketNumber"] for row in rows] == [i.TicketNumber for i in infos]
    assert sorted(numbers.values()) == [f"T{day}.000{n}" for n in (1, 2, 3)]
    notes = [line["note"] for row in rows for line in row.trace if line["step"] == "store"]
    assert notes and all("~" not in note for note in notes)
    assert f"({infos[0].TicketNumber})" in notes[0]


def test_two_batches_adding_the_same_cc_to_one_ticket_cost_no_rollback(
        pg_ing: Ingestor, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Two replies to one ticket, each with the same colleague in Cc, in two workers' batches
    at once: both add the colleague to the ticket; the later insert waits for the earlier
    transaction and then does nothing (before, it failed its whole batch)."""
    ing = pg_ing
    cc = "Carla <carla@techcorp.com>"
    parent = ing.process(spool(ing, mail("Printer broken", message_id="p@x"))[0])
    ing.process(spool(ing, mail("Hello", sender=cc, message_id="c@x"))[0])  # a known person
    r1, x = spool(ing, mail("Re: Printer broken", message_id="r1@x", In_Reply_To="<p@x>",
                            Cc=cc), mail("Other", message_id="x@x"))
    r2, y = spool(ing, mail("Re: Printer broken", message_id="r2@x", In_Reply_To="<p@x>",
                            Cc=cc), mail("Another", message_id="y@x"))
    infos = overlapping_batches(ing, monkeypatch, [r1, x], [r2, y], pause_at=x)
    with ing.session() as s:
        ticket = s.get(Ticket, parent.TicketId)
        assert ticket is not None
        colleagues = [p.email for p in ticket.secondary_persons]
    assert [infos[i].Action for i in (r1, x, r2, y)] == [
        "appended", "created", "appended", "created"]
    assert colleagues == ["carla@techcorp.com"]
    assert "one by one" not in caplog.text

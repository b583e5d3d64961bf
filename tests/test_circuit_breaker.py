"""The circuit breaker on incoming rate (``ingest/steps/circuit_breaker.py``) and the reopen cap.

The headline case: two misbehaving autoresponders that set neither ``Auto-Submitted`` nor
``Precedence`` (so ``classify`` cannot tell them from people) answer each other for 200 rounds,
each answer reply-all with the support address in Cc.  Without the breaker every round is a new
ticket; with the default ``[limits]`` the ticket count stays small, and every held mail is kept
as ``quarantined`` with a ``circuit breaker: ...`` reason.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ingest.config import load_settings
from ingest.models import InboundMail, Message, Ticket
from ingest.service import Ingestor
from ingest.spool import Envelope
from ingest.steps.circuit_breaker import subject_key
from ingest.ticketinfo import TicketInfo
from workers import cli

ROUNDS = 200
BASE = """
[[category]]
name = "General"
[[priority]]
name = "Medium"
[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
category = "General"
priority = "Medium"
"""


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Ingestor]]:
    made: list[Ingestor] = []

    def build(limits: str = "", db: str = "tg.db") -> Ingestor:
        path = tmp_path / f"ticketgate-{len(made)}.toml"
        path.write_text((f"[limits]\n{limits}\n" if limits else "") + BASE, encoding="utf-8")
        ingestor = Ingestor(load_settings(path, database_url=f"sqlite:///{tmp_path / db}"))
        made.append(ingestor)
        return ingestor

    yield build
    for ingestor in made:
        ingestor.close()


def autoresponder_mail(n: int, sender: str, other: str, subject: str,
                       in_reply_to: str | None) -> bytes:
    """What a careless autoresponder sends: a plain reply, no RFC 3834 headers at all."""
    lines = [f"From: Shop robot <{sender}>", f"To: {other}", "Cc: support@example.com",
             f"Subject: {subject}", f"Message-ID: <loop-{n}@{sender.rpartition('@')[2]}>",
             "Date: Sun, 22 Nov 2026 10:00:00 +0000", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8"]
    if in_reply_to:
        lines += [f"In-Reply-To: <{in_reply_to}>", f"References: <{in_reply_to}>"]
    body = "Thank you for your message. We will get back to you within 2 business days.\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def run_loop(ing: Ingestor, rounds: int = ROUNDS, threaded: bool = False) -> Counter[str]:
    """Robot A and robot B answer each other; ticketgate gets every answer (Cc)."""
    robots = ("robot@shop-a.test", "robot@shop-b.test")
    subject = "Your order 4711"
    previous: str | None = None
    actions: Counter[str] = Counter()
    for n in range(rounds):
        sender, other = robots[n % 2], robots[(n + 1) % 2]
        subject = "Re: " + subject if n % 3 else subject  # some add "Re:", some do not
        raw = autoresponder_mail(n, sender, other, subject, previous if threaded else None)
        info = ing.ingest(raw, 1, door="smtp", source="loop", envelope=Envelope(
            mail_from=sender, rcpt_to=["support@example.com"], client_ip="127.0.0.1"))
        actions[info.Action] += 1
        if info.Action == "quarantined":
            assert (info.Reason or "").startswith("circuit breaker: "), info
        previous = f"loop-{n}@{sender.rpartition('@')[2]}"
    return actions


def tickets(ing: Ingestor) -> int:
    with ing.session() as s:
        return int(s.scalar(select(func.count()).select_from(Ticket)) or 0)


def messages(ing: Ingestor) -> int:
    with ing.session() as s:
        return int(s.scalar(select(func.count()).select_from(Message)) or 0)


def test_two_autoresponders_200_rounds_default_limits(make: Callable[..., Ingestor]) -> None:
    ing = make()
    actions = run_loop(ing)
    count = tickets(ing)
    print(f"\n{ROUNDS} rounds between two autoresponders without Auto-Submitted/Precedence: "
          f"{count} tickets, {messages(ing)} messages stored, actions {dict(actions)}")
    limits = ing.settings.limits
    assert count <= 2 * limits.per_sender_subject_max  # one subject, two senders
    assert actions["quarantined"] >= ROUNDS - 2 * limits.per_sender_subject_max
    assert sum(actions.values()) == ROUNDS
    with ing.session() as s:
        states = Counter(s.scalars(select(InboundMail.state)).all())
    assert states == Counter({"created": count, "quarantined": ROUNDS - count})


def test_the_same_loop_without_the_breaker_is_a_ticket_storm(
        make: Callable[..., Ingestor]) -> None:
    """The control: the loop above is only bounded because of the breaker."""
    ing = make("per_sender_subject_max = 0\nper_sender_max = 0\nper_ticket_max = 0")
    actions = run_loop(ing)
    assert tickets(ing) == ROUNDS and actions == Counter({"created": ROUNDS})


def test_loop_that_keeps_in_reply_to_is_capped_per_ticket(
        make: Callable[..., Ingestor]) -> None:
    ing = make()
    actions = run_loop(ing, threaded=True)
    limit = ing.settings.limits.per_ticket_max
    print(f"\n{ROUNDS} threaded rounds: {tickets(ing)} ticket(s), {messages(ing)} messages, "
          f"actions {dict(actions)}")
    assert tickets(ing) == 1
    assert messages(ing) == limit
    assert actions == Counter({"created": 1, "appended": limit - 1,
                               "quarantined": ROUNDS - limit})


def test_per_sender_ceiling_counts_every_subject(make: Callable[..., Ingestor]) -> None:
    ing = make("per_sender_max = 5")
    results = [ing.ingest(autoresponder_mail(n, "alerts@monitor.test", "x@y.test",
                                             f"Disk {n} full", None), 1, door="imap")
               for n in range(8)]
    assert [r.Action for r in results] == ["created"] * 5 + ["quarantined"] * 3
    assert "alerts@monitor.test sent 5 mails in the last 3600 s (limit 5 per sender)" in (
        results[-1].Reason or "")


def test_a_mailbox_backlog_is_counted_by_arrival_not_by_processing(
        make: Callable[..., Ingestor]) -> None:
    """An IMAP mailbox taken over with a year of monthly reports from one sender on one subject:
    they arrived weeks apart (INTERNALDATE), so none is held.  The same reports arriving within
    the hour are a storm again."""
    ing = make("per_sender_subject_max = 3")
    year_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
    backlog = ing.receive_batch(
        [(autoresponder_mail(n, "reports@erp.test", "x@y.test", "Monthly report", None),
          f"INBOX:{n}") for n in range(12)], 1, "imap",
        arrived=[year_ago + dt.timedelta(days=30 * n) for n in range(12)])
    assert [ing.process(s.inbound_id).Action for s in backlog] == ["created"] * 12
    with ing.session() as s:
        assert s.scalar(select(func.min(Message.arrived_at))) == year_ago
    burst = ing.receive_batch(
        [(autoresponder_mail(100 + n, "reports@erp.test", "x@y.test", "Monthly report", None),
          f"INBOX:{100 + n}") for n in range(5)], 1, "imap",
        arrived=[dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5 - n) for n in range(5)])
    assert [ing.process(s.inbound_id).Action for s in burst] == (
        ["created"] * 3 + ["quarantined"] * 2)


def test_replay_door_is_not_watched_by_default(make: Callable[..., Ingestor]) -> None:
    """``ticketgate replay`` of an archive is a bulk import, not a storm."""
    ing = make("per_sender_max = 2")
    results = [ing.ingest(autoresponder_mail(n, "a@b.test", "c@d.test", "Same", None), 1)
               for n in range(4)]
    assert [r.Action for r in results] == ["created"] * 4


def test_a_watched_replay_counts_the_mails_of_its_own_batch(
        make: Callable[..., Ingestor]) -> None:
    """A replay batch writes its messages at its end (``store.write_messages``); the breaker
    still counts the ones the batch stored before, by sender, by subject and by ticket."""
    ing = make('doors = ["replay"]\nper_sender_max = 5\nper_sender_subject_max = 2\n'
               "per_ticket_max = 3")
    stream = [(autoresponder_mail(n, "a@b.test", "c@d.test", "Same", None), f"same-{n}")
              for n in range(3)]
    stream += [(autoresponder_mail(10 + n, "e@f.test", "c@d.test", "Thread",
                                   "loop-10@f.test" if n else None), f"thread-{n}")
               for n in range(5)]
    stream += [(autoresponder_mail(20 + n, "a@b.test", "c@d.test", f"Other {n}", None),
                f"other-{n}") for n in range(4)]
    results = dict(ing.ingest_many(stream, 1, batch_size=64, parse_helpers=0))
    actions = [results[source].Action for _raw, source in stream]  # type: ignore[union-attr]
    assert actions == [
        "created", "created", "quarantined",  # per sender and subject: 2
        "created", "appended", "appended", "quarantined", "quarantined",  # per ticket: 3
        "created", "created", "created", "quarantined",  # per sender: 5
    ]
    assert tickets(ing) == 6 and messages(ing) == 8


def test_counts_come_from_the_database_so_all_workers_share_them(
        make: Callable[..., Ingestor]) -> None:
    one = make("per_sender_subject_max = 3")
    two = make("per_sender_subject_max = 3")  # another worker process on the same database
    results = [(one if n % 2 else two).ingest(
        autoresponder_mail(n, "a@b.test", "c@d.test", "Same", None), 1, door="http")
        for n in range(6)]
    assert [r.Action for r in results] == ["created"] * 3 + ["quarantined"] * 3


def test_quarantine_replay_releases_a_held_mail(make: Callable[..., Ingestor], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ing = make("per_sender_subject_max = 1")
    first = ing.ingest(autoresponder_mail(1, "a@b.test", "c@d.test", "Same", None), 1,
                       door="smtp")
    held = ing.ingest(autoresponder_mail(2, "a@b.test", "c@d.test", "Re: Same", None), 1,
                      door="smtp")
    assert first.Action == "created" and held.Action == "quarantined"
    assert "on this subject" in (held.Reason or "")
    # The list says why: a hold has a reason and no error (its column was empty).
    monkeypatch.setenv("TICKETGATE_DATABASE_URL", str(ing.engine.url))
    listed = CliRunner().invoke(cli.app, ["quarantine", "list", "--config",
                                          str(tmp_path / "ticketgate-0.toml")],
                                env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    (line,) = [row for row in listed.stdout.splitlines() if f" {held.InboundId} " in row]
    assert "circuit breaker" in line, listed.stdout
    released = ing.replay_quarantined(held.InboundId or 0)
    assert released.Action == "created"


def _close(ing: Ingestor, ticket_id: int) -> None:
    with ing.session() as s:
        ticket = s.get(Ticket, ticket_id)
        assert ticket is not None
        ticket.base_status = "closed"
        s.commit()


def test_reopen_count_is_capped(make: Callable[..., Ingestor]) -> None:
    ing = make("max_reopens_per_ticket = 2")
    first = ing.ingest(autoresponder_mail(0, "a@b.test", "c@d.test", "Help", None), 1)
    infos: list[TicketInfo] = []
    for n in range(1, 5):
        _close(ing, first.TicketId)
        infos.append(ing.ingest(autoresponder_mail(n, "a@b.test", "c@d.test", "Re: Help",
                                                   f"loop-{n - 1}@b.test"), 1))
    assert [i.Action for i in infos] == ["appended"] * 4
    with ing.session() as s:
        ticket = s.get(Ticket, first.TicketId)
        assert ticket is not None
        assert ticket.reopen_count == 2 and ticket.base_status == "closed"
    assert "circuit breaker: ticket" in (infos[2].Reason or "")
    assert "reopened 2 times (limit 2)" in (infos[3].Reason or "")


def test_subject_key_ignores_reply_prefixes_tags_and_ticket_numbers() -> None:
    base = subject_key("Your order 4711")
    for variant in ("Re: Your order 4711", "RE: AW: Re: your  order 4711",
                    "Re: [#12] Your order 4711", "Fwd: Re[2]: Your order 4711 (T20261122.0001)",
                    "SV: Re:Your order 4711"):
        assert subject_key(variant) == base, variant
    assert subject_key("Your order 4712") != base

"""Group commit of the SMTP listener's spool writes (``workers/group_commit.py`` and
``Ingestor.receive_group``): mails that wait together are written together, each submitter gets
its own answer, and a mail the database refuses fails alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from ingest.errors import SpoolError
from ingest.models import InboundMail
from ingest.service import Ingestor, SpoolRequest
from ingest.spool import Envelope
from tests.test_pipeline import CONFIG, mail
from workers.group_commit import GroupCommit


def test_items_waiting_together_are_written_in_one_group() -> None:
    written: list[list[int]] = []

    def write(items: list[int]) -> list[int | Exception]:
        written.append(items)
        return [item * 10 if item != 3 else ValueError("three") for item in items]

    async def main() -> list[int | BaseException]:
        commit: GroupCommit[int, int] = GroupCommit(write)
        return await asyncio.gather(*(commit.submit(i, 1) for i in range(1, 6)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert written == [[1, 2, 3, 4, 5]]
    assert results[:2] == [10, 20] and results[3:] == [40, 50]
    assert isinstance(results[2], ValueError) and str(results[2]) == "three"


def test_groups_respect_the_item_and_byte_limits_and_later_items_wait_for_the_next() -> None:
    written: list[list[str]] = []
    release = threading.Event()

    def write(items: list[str]) -> list[str]:
        written.append(items)
        release.wait(5)  # the first write is slow: what comes meanwhile forms the next group
        return [item.upper() for item in items]

    async def main() -> list[str]:
        commit: GroupCommit[str, str] = GroupCommit(write, max_items=3, max_bytes=100)
        first = asyncio.ensure_future(commit.submit("a", 10))
        await asyncio.sleep(0.05)  # the writer took "a" alone and is in its thread
        rest = [asyncio.ensure_future(commit.submit(x, size))
                for x, size in [("b", 10), ("c", 10), ("d", 10), ("e", 90), ("f", 11)]]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == ["A", "B", "C", "D", "E", "F"]
    # Three items at most; then "e" (90 bytes) and "f" (11) would exceed 100 bytes together.
    assert written == [["a"], ["b", "c", "d"], ["e"], ["f"]]


def test_a_failed_write_reaches_every_submitter_of_its_group_and_the_next_group_runs() -> None:
    calls = 0

    def write(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")
        return items

    async def main() -> tuple[list[int | BaseException], int]:
        commit: GroupCommit[int, int] = GroupCommit(write)
        failed = await asyncio.gather(commit.submit(1, 1), commit.submit(2, 1),
                                      return_exceptions=True)
        return failed, await commit.submit(3, 1)

    failed, later = asyncio.run(main())
    assert [type(f) for f in failed] == [OSError, OSError]
    assert later == 3


def test_a_submitter_cancelled_before_its_group_is_taken_is_not_written() -> None:
    written: list[int] = []
    release = threading.Event()

    def write(items: list[int]) -> list[int]:
        written.extend(items)
        release.wait(5)
        return items

    async def main() -> int:
        commit: GroupCommit[int, int] = GroupCommit(write)
        first = asyncio.ensure_future(commit.submit(1, 1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(commit.submit(2, 1))
        kept = asyncio.ensure_future(commit.submit(3, 1))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        await first
        return await kept

    assert asyncio.run(main()) == 3
    assert written == [1, 3]


@pytest.fixture
def ing(make_ingestor: Callable[..., Ingestor], tmp_path: Path) -> Ingestor:
    return make_ingestor(CONFIG.format(reopen="reopen"), tmp_path)


def test_receive_group_stores_each_mail_for_its_mailboxes_in_one_go(ing: Ingestor) -> None:
    requests = [
        SpoolRequest(mail("first", message_id="g1@example.org"), [1], "smtp a",
                     Envelope(mail_from="a@example.org", rcpt_to=["support@example.com"])),
        SpoolRequest(mail("second", message_id="g2@example.org"), [1, 2], "smtp b",
                     Envelope(mail_from="b@example.org",
                              rcpt_to=["support@example.com", "billing@example.com"])),
    ]
    results = ing.receive_group(requests, "smtp")
    assert [len(r) for r in results if isinstance(r, list)] == [1, 2]
    ids = [i for r in results if isinstance(r, list) for i in r]
    assert len(set(ids)) == 3
    with ing.session() as s:
        rows = {row.id: row for row in s.execute(
            select(InboundMail.id, InboundMail.mailbox_id, InboundMail.source,
                   InboundMail.envelope_from, InboundMail.header_message_id, InboundMail.raw)
            .where(InboundMail.id.in_(ids)))}
    assert [(rows[i].mailbox_id, rows[i].source, rows[i].envelope_from,
             rows[i].header_message_id) for i in ids] == [
        (1, "smtp a", "a@example.org", "g1@example.org"),
        (1, "smtp b", "b@example.org", "g2@example.org"),
        (2, "smtp b", "b@example.org", "g2@example.org")]
    assert rows[ids[0]].raw == requests[0].raw


def test_a_mail_the_database_refuses_fails_alone(ing: Ingestor) -> None:
    """A lone surrogate cannot be encoded for either database: that request's group transaction
    fails, and the group is redone one request at a time."""
    good = SpoolRequest(mail("good", message_id="ok1@example.org"), [1], "smtp ok")
    bad = SpoolRequest(mail("bad", message_id="bad@example.org"), [1], "smtp \udcff")
    also_good = SpoolRequest(mail("good too", message_id="ok2@example.org"), [2], "smtp ok2")
    results = ing.receive_group([good, bad, also_good], "smtp")
    assert isinstance(results[1], SpoolError)
    assert isinstance(results[0], list) and isinstance(results[2], list)
    with ing.session() as s:
        stored = s.execute(select(InboundMail.header_message_id)
                           .order_by(InboundMail.id)).scalars().all()
    assert stored == ["ok1@example.org", "ok2@example.org"]
    assert ing.receive_group([bad], "smtp")[0].__class__ is SpoolError

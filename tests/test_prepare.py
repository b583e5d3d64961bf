"""Replay's parse helpers (ingest/prepare.py): the same results as parsing in-process.

Real helper processes parse real mails (the shared corpus and the scenario fixtures); the
results, the stored messages and the inbound records are compared with an in-process replay of
the same mails into another database.  A helper that dies mid-replay costs speed, not mail.
The helpers never touch the database, so SQLite files stand for both backends here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import ingest.prepare
from ingest.config import load_settings
from ingest.models import Attachment, InboundMail, Message
from ingest.service import Ingestor, RecordedError
from tests.test_corpus import collect_inputs, corpus_root

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
MAILS = 260  # enough for several helper chunks past the start


def _inputs() -> list[tuple[bytes, str]]:
    root = corpus_root()
    if not root.is_dir():  # CI has the shared folder beside the clone; say so loudly if not
        pytest.fail(f"corpus not found at {root} (set TICKETGATE_CORPUS)")
    fixture_mails = sorted((FIXTURES / "mail").glob("*.eml"))
    mails = [(path.read_bytes(), path.name) for path in fixture_mails]
    inputs, _excluded = collect_inputs(root)
    mails += [(item.raw, item.label) for item in inputs if item.raw][: MAILS - len(mails)]
    return mails


def _replay(ingestor: Ingestor, mails: list[tuple[bytes, str]], helpers: int
            ) -> list[dict[str, Any]]:
    results = []
    for _source, result in ingestor.ingest_many(iter(mails), 1, parse_helpers=helpers):
        info = result.info if isinstance(result, RecordedError) else result
        results.append(info.model_dump())
    return results


def _stored(ingestor: Ingestor) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    """Every inbound record's outcome and every message with its attachments, and how many
    mails a helper parsed (the parse step's trace line says so)."""
    with ingestor.sessions() as session:
        inbound = session.scalars(select(InboundMail).order_by(InboundMail.id)).all()
        records = [(r.id, r.source, r.state, r.reason, r.ticket_id, r.ticket_message_id,
                    r.dedupe_claim, r.duplicate_of_id) for r in inbound]
        helped = sum(1 for r in inbound for line in r.trace or []
                     if line.get("step") == "parse" and line.get("helper"))
        messages = []
        for message in session.scalars(select(Message).order_by(Message.id)):
            files = session.execute(
                select(Attachment.filename, Attachment.sha256, Attachment.content_type)
                .where(Attachment.message_id == message.id).order_by(Attachment.id)).all()
            messages.append((message.id, message.ticket_id, message.subject, message.from_address,
                             message.body_text, message.visible_text, message.body_html,
                             message.kind, tuple(map(tuple, files))))
    return records, messages, helped


@pytest.fixture
def start_helpers_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helpers from the 16th mail on, at the test's own priority: at their usual lower one, a
    machine busy with other work (a CI host's other jobs) starved them, the replaying process
    parsed every chunk itself, and no helper result was compared."""
    monkeypatch.setattr(ingest.prepare, "START_AFTER", 16)
    monkeypatch.setattr(ingest.prepare, "HELPER_NICENESS", 0)


@pytest.fixture
def fresh_ingestor(tmp_path: Path) -> Iterator[Any]:
    made: list[Ingestor] = []

    def build() -> Ingestor:
        url = f"sqlite:///{tmp_path / f'replay-{len(made)}.db'}"
        made.append(Ingestor(load_settings(None, database_url=url)))
        return made[-1]

    yield build
    for ingestor in made:
        ingestor.close()


@pytest.mark.usefixtures("start_helpers_early")
def test_helpers_give_the_in_process_result(fresh_ingestor: Any) -> None:
    mails = _inputs()
    alone = fresh_ingestor()
    expected = _replay(alone, mails, helpers=0)
    records, messages, helped = _stored(alone)
    assert helped == 0

    helped_ingestor = fresh_ingestor()
    assert _replay(helped_ingestor, mails, helpers=2) == expected
    got_records, got_messages, got_helped = _stored(helped_ingestor)
    assert got_records == records
    assert got_messages == messages
    # The caller parses whatever no helper has finished when it gets there, so how many the
    # helpers parse depends on the machine; at least one chunk, or nothing was compared.
    assert got_helped >= ingest.prepare.CHUNK_MAILS, "no helper result was used"


def _die_on_the_60th(raw: bytes, max_bytes: int, _calls: list[int] = [0]  # noqa: B006
                     ) -> Any:
    """Runs in a helper (forked after the patch): the helper process dies mid-replay."""
    _calls[0] += 1
    if _calls[0] == 60:
        os._exit(9)
    return original_prepare(raw, max_bytes)


original_prepare = ingest.prepare.prepare


@pytest.mark.usefixtures("start_helpers_early")
def test_a_helper_that_dies_loses_nothing(fresh_ingestor: Any, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    mails = _inputs()
    alone = fresh_ingestor()
    expected = _replay(alone, mails, helpers=0)
    records, messages, _helped = _stored(alone)

    monkeypatch.setattr(ingest.prepare, "prepare", _die_on_the_60th)
    survivor = fresh_ingestor()
    assert _replay(survivor, mails, helpers=1) == expected
    got_records, got_messages, got_helped = _stored(survivor)
    assert got_records == records
    assert got_messages == messages
    assert got_helped < len(mails) - 16, "a dead helper parsed everything?"
    assert any("parse helper" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records), "the helper's death went unnoticed"


def test_warm_up_fills_what_the_first_mail_would_pay_for() -> None:
    """A Celery worker warms up before it forks its pool: in a fresh interpreter, warm_up()
    must leave the quote-header patterns compiled and the sample's quote cut off."""
    code = (
        "from ingest import prepare, reply\n"
        "assert reply._header_patterns.cache_info().currsize == 0\n"
        "prepare.warm_up()\n"
        "assert reply._header_patterns.cache_info().currsize == 1\n"
        "mail = prepare.prepare_mail(prepare._WARM_UP_MAIL, 10**6)\n"
        "print(repr(mail.visible_text))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == repr("Thanks, that helped.")

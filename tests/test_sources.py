"""Replay's mail sources: how an mbox is split into mails (``ingest/sources.py``)."""

from __future__ import annotations

import mailbox
import os
from pathlib import Path

import pytest

from ingest.sources import iter_mails
from tests.test_corpus import MBOX_FILES, corpus_root

FIRST = (b"From: anna@customer.example\nSubject: printer broken\nMessage-ID: <mbox-1@x>\n\n"
         b"Hi, the printer is broken.\n\nFrom my phone\nSent: Monday\n\nThanks, Anna\n")
SECOND = (b"From: ben@customer.example\nSubject: scanner\nMessage-ID: <mbox-2@x>\n\n"
          b"And the scanner.\n")


def test_an_unescaped_from_line_in_a_body_does_not_split_the_mail(tmp_path: Path) -> None:
    """mboxo writers leave body lines that start with "From " as they are.  Split at every
    such line (``mailbox.mbox``), the first mail became two tickets, itself cut short; only a
    separator ("From " sender and date, after an empty line) starts a mail."""
    path = tmp_path / "inbox"
    path.write_bytes(b"From anna@customer.example Mon Jan  1 10:00:00 2024\n" + FIRST
                     + b"\nFrom ben@customer.example Mon Jan  1 10:05:00 2024\n" + SECOND)
    items = list(iter_mails([path]))
    assert [item.label for item in items] == [f"{path}#1", f"{path}#2"]
    assert [item.raw for item in items] == [FIRST, SECOND]


def test_a_separator_after_a_line_of_text_still_starts_a_mail(tmp_path: Path) -> None:
    """Files joined with ``cat`` often have no empty line before a separator; as with
    ``mailbox.mbox``, the separator still starts the next mail."""
    path = tmp_path / "inbox"
    path.write_bytes(b"From anna@customer.example Mon Jan  1 10:00:00 2024\n" + FIRST
                     + b"From ben@customer.example Mon Jan  1 10:05:00 2024\n" + SECOND)
    assert [item.raw for item in iter_mails([path])] == [FIRST, SECOND]


def test_corpus_mboxes_give_the_bytes_an_earlier_replay_stored() -> None:
    """Without an unescaped "From " line, each mail's bytes are the ones ``mailbox.mbox``
    gave: a mail without a Message-ID is known by its bytes' hash, and must stay a duplicate
    of what an earlier replay stored."""
    root = corpus_root()
    paths = sorted(p for pattern in MBOX_FILES for p in root.glob(pattern)
                   if p.suffix != ".eml")
    if not paths:
        reason = f"mail corpus not found at {root}"
        if os.environ.get("TICKETGATE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    for path in paths:
        box = mailbox.mbox(path, factory=None, create=False)
        expected = [box.get_bytes(key, from_=False) for key in box.iterkeys()]
        assert [item.raw for item in iter_mails([path])] == expected, path
        assert len(expected) > 0

"""The quote-header search of ingest/reply.py finds exactly what a plain regex search finds.

``_find_headers`` tries mail-parser-reply's header forms only at line starts near a colon and
leaves out forms a text cannot match, for speed.  This checks, on every text the fixtures, the
generated benchmark mails and the shared corpus give, that the headers found are those of a
plain ``finditer`` of the parser's whole regex (and of ours) over the text: if a new
mail-parser-reply version adds a form that starts elsewhere, this fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailparser_reply.parser import EmailMessage

from ingest import reply
from ingest.parse import parse_mail
from ingest.sources import iter_mails

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"


def _plain_headers(lines: list[str]) -> dict[int, tuple[int, bool]]:
    """The reference: every pattern searched at every position of the text."""
    stripped = "\n".join(line.strip() for line in lines)
    whole = EmailMessage(text="", languages=list(reply.LANGUAGES)).HEADER_REGEX
    headers: dict[int, reply._Header] = {}
    for regex in (whole, *reply._EXTRA_HEADERS):
        for match in regex.finditer(stripped):
            reply._note_header(headers, lines, stripped, match)
    return {first: (h.end, h.attribution) for first, h in headers.items()}


def _fast_headers(lines: list[str]) -> dict[int, tuple[int, bool]]:
    return {first: (h.end, h.attribution) for first, h in reply._find_headers(lines).items()}


def _texts() -> Iterator[tuple[str, str]]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from generate import generate_mails
    finally:
        sys.path.remove(str(ROOT / "bench"))
    raws: list[tuple[str, bytes]] = [(f"generated#{i}", raw)
                                      for i, raw in enumerate(generate_mails(600))]
    raws += [(str(p), p.read_bytes()) for p in sorted((ROOT / "fixtures").rglob("*.eml"))]
    corpus = Path(os.environ.get("TICKETGATE_CORPUS") or DEFAULT_CORPUS)
    if corpus.is_dir():
        raws += [(item.label, item.raw) for item in iter_mails([corpus]) if item.raw]
    for label, raw in raws:
        try:
            text = parse_mail(raw).text
        except Exception:  # unparseable inputs are the corpus test's business
            continue
        yield label, text[: reply.MAX_REPLY_INPUT].replace("\r\n", "\n").replace("\r", "\n")


def test_header_search_equals_plain_search() -> None:
    checked = differing = with_headers = 0
    first_difference = ""
    for label, text in _texts():
        lines = text.split("\n")
        fast, plain = _fast_headers(lines), _plain_headers(lines)
        checked += 1
        with_headers += bool(plain)
        if fast != plain:
            differing += 1
            first_difference = first_difference or f"{label}: {fast} != {plain}"
    print(f"reply headers: {checked} texts, {with_headers} with quote headers, "
          f"{differing} differing")
    assert checked > 600 and with_headers > 300
    assert differing == 0, first_difference


@pytest.mark.parametrize("text", [
    "Thanks!\n\nOn Mon, 3 Jun 2024 at 10:00, Ann <ann@example.com>\nwrote:\n> old\n",
    "ok\n\n2024年6月3日(月) 10:00 山田 <y@example.jp>:\n> 古い\n",
    "ok\n\n发件人: 张三\n发送时间: 2024年6月3日\n\n旧\n",
    "ok\n\n2024년 6월 3일 (월) 오전 10:00, Kim <k@example.kr>님이 작성하였습니다:\n> 옛\n",
    "answer\n\nFrom: A <a@example.com>\nSent: Monday\nTo: B\nSubject: x\n\nold text\n",
    "answer\n\n-----Original Message-----\nold\n",
    "answer\n\n*From:*\n\n*Sent:* today\nmore\n",
    "ответ\n\n12.03.2024 пользователь Иван написал\n:\n> старое\n",
])
def test_header_search_on_edge_forms(text: str) -> None:
    lines = text.split("\n")
    assert _fast_headers(lines) == _plain_headers(lines)
    assert _plain_headers(lines), "the example must contain a quote header"


def test_a_form_that_cannot_match_is_left_out() -> None:
    pattern = reply._header_patterns()[0]
    without_cjk = pattern.regex_for(frozenset())
    with_year = pattern.regex_for(frozenset({"\u5e74"}))
    assert "\u5e74" in with_year.pattern and "\u5e74" not in without_cjk.pattern

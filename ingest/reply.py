"""The visible part of a reply: what the customer wrote now, without quoted history/signature.

mail-parser-reply knows the quote headers of the common clients in many languages; an agent reads
this first, while the full body stays stored beside it.
"""

from __future__ import annotations

from functools import lru_cache

from mailparser_reply import EmailReplyParser

LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "sv", "da", "pl", "cs", "ja", "zh", "ko"]
MAX_REPLY_INPUT = 200_000  # the parser is regex-based; cap the text it scans


@lru_cache(maxsize=1)
def _parser() -> EmailReplyParser:
    return EmailReplyParser(languages=LANGUAGES)


def visible_reply(text: str) -> str:
    if not text.strip():
        return ""
    try:
        reply = _parser().parse_reply(text=text[:MAX_REPLY_INPUT])
    except Exception:  # a parser failure must not cost the mail: show the whole text
        return text.strip()
    return (reply or "").strip() or text.strip()

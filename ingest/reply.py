"""The visible part of a reply: what the customer wrote now, without quoted history/signature.

mail-parser-reply knows the quote headers of the common clients in many languages; an agent reads
this first, while the full body stays stored beside it.  On top of its header detection this
module adds what a help desk needs and the parser does not do:

* inline and bottom posting: text written *below* a ``>``-quoted block ("On ... wrote:" then
  ``> ...`` then the answer) is part of the reply, as in github's and Zapier's
  email_reply_parser; text below an Outlook-style header block (``From:``/``Sent:``) is not,
  because that history carries no quote marks;
* attribution lines the parser has no language table for (Russian clients, and the
  language-independent "date ... <address>:" form that talon also keys on);
* the original line layout (indentation of lists and code is kept);
* trailing noise: the RFC 3676 signature (``-- ``), dangling separator lines, mobile
  "Sent from my ..." lines and mailing-list footers below a long rule.

Sign-offs such as "Thanks,\\nAlex" are kept: they are part of what the person wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from mailparser_reply.parser import EmailMessage

LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "sv", "da", "pl", "cs", "ja", "zh", "ko"]
MAX_REPLY_INPUT = 200_000  # the parser is regex-based; cap the text it scans
MAX_ATTRIBUTION_WRAP = 2  # lines an attribution ("On <date>, <name> <\naddr> wrote:") wraps over

# Attribution lines and header blocks of clients mail-parser-reply has no table for.
_EXTRA_HEADERS = (
    # Russian: "<date> пользователь <name> написал:", "<name> пишет:"
    re.compile(r"^.{0,200}\b(?:написал|написала|пишет)\s*:[ \t]*$", re.M | re.I),
    # Russian Outlook / Windows Mail header block
    re.compile(
        r"^(?:[* ]*(?:От|Отправлено|Кому|Тема|Дата|Копия)\s*:[ *]*.*(?:\n|$)){2,}", re.M | re.I
    ),
    # Any language: a line ending in ":" that names an address and a date or time
    # ("Thu, 26 Jun 2014 14:00:51 +0400 от Alexander L <abc@example.com>:").
    re.compile(
        r"^(?=[^\n]*\d{1,2}[:.]\d{2})(?=[^\n]*[\w.+-]+@[\w-]+\.[\w.-]+)[^\n]{0,300}:[ \t]*$",
        re.M,
    ),
)
_QUOTED = re.compile(r"^\s*>")
_DATE_OR_ADDRESS = re.compile(r"\d{1,2}[:./-]\d{1,2}|@")
_SIGNATURE_DELIMITER = re.compile(r"^--\s*$")  # RFC 3676 "-- ", often with the space lost
_LONG_RULE = re.compile(r"^\s*[_-]{30,}\s*$")  # Outlook separator, Mailman footer rule
_SEPARATOR = re.compile(r"^\s*[-_=*~]{2,}\s*$")
_SENT_FROM = re.compile(
    r"^\s*(?:Sent from my|Get Outlook for|Sent from Outlook for|Von meinem \S+ gesendet"
    r"|Envoyé de mon|Enviado desde mi|Inviato da(?:l mio)?)(?:\s+[\w.&-]+){0,4}\s*\.?\s*$",
    re.I,
)
_DASH_NAME = re.compile(r"^\s*-[A-Za-z][\w.'-]*(?: [\w.'-]+){0,2}\s*$")  # "-Abhishek Kona"


@dataclass(frozen=True, slots=True)
class _Header:
    end: int  # index of the first line after the header
    attribution: bool  # "... wrote:" (history follows as '>' lines) vs a From:/Sent: block


@lru_cache(maxsize=1)
def _header_patterns() -> tuple[re.Pattern[str], ...]:
    """mail-parser-reply's quote-header regex for our languages, then ours."""
    parser_regex = EmailMessage(text="", languages=list(LANGUAGES)).HEADER_REGEX
    return (parser_regex, *_EXTRA_HEADERS)


def _find_headers(lines: list[str]) -> dict[int, _Header]:
    """Quote headers by first line index, found on the lines stripped of indentation."""
    stripped = "\n".join(line.strip() for line in lines)
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line.strip()) + 1)
    headers: dict[int, _Header] = {}
    for pattern in _header_patterns():
        for match in pattern.finditer(stripped):
            text = match.group()
            lead = len(text) - len(text.lstrip())
            if not text.strip():
                continue
            first = stripped.count("\n", 0, match.start() + lead)
            last = stripped.count("\n", 0, match.end() - (len(text) - len(text.rstrip())))
            if _QUOTED.match(lines[first]):
                continue  # a header inside quoted history is history already
            attribution = text.rstrip().endswith(":")
            if attribution:  # include the first part of a wrapped attribution line
                for _ in range(MAX_ATTRIBUTION_WRAP):
                    above = lines[first - 1].strip() if first > 0 else ""
                    if not above or above[-1] in ".!?" or not _DATE_OR_ADDRESS.search(above):
                        break
                    first -= 1
            known = headers.get(first)
            if known is None or known.end < last + 1:
                headers[first] = _Header(end=last + 1, attribution=attribution)
    return headers


def _reply_lines(lines: list[str]) -> list[str]:
    """The unquoted lines before the history, plus inline answers between quoted blocks."""
    headers = _find_headers(lines)
    out: list[str] = []
    index = 0
    while index < len(lines):
        header = headers.get(index)
        if header is not None:
            if not header.attribution:
                break  # an Outlook-style block: everything below is unmarked history
            index = header.end
            quoted = False
            while index < len(lines) and (_QUOTED.match(lines[index]) or not lines[index].strip()):
                quoted = quoted or bool(_QUOTED.match(lines[index]))
                index += 1
            if not quoted:
                break  # history without '>' marks (an HTML quote turned into text)
            out.append("")
            continue
        if not _QUOTED.match(lines[index]):
            out.append(lines[index].rstrip())
        index += 1
    return out


def _trim_noise(lines: list[str]) -> list[str]:
    """Drop the signature, footers and trailing separators, mobile and dash sign-offs."""
    for index, line in enumerate(lines):
        if index > 0 and (_SIGNATURE_DELIMITER.match(line) or _LONG_RULE.match(line)):
            lines = lines[:index]
            break
    while lines:
        last = lines[-1]
        noise = not last.strip() or _SEPARATOR.match(last) or _SENT_FROM.match(last)
        dash_signature = _DASH_NAME.match(last) and len(lines) > 1
        if not (noise or dash_signature):
            break
        lines = lines[:-1]
    return lines


def visible_reply(text: str) -> str:
    """The part of ``text`` the sender wrote now; the whole text when nothing else is found."""
    if not text.strip():
        return ""
    text = text[:MAX_REPLY_INPUT].replace("\r\n", "\n").replace("\r", "\n")
    try:
        lines = _trim_noise(_reply_lines(text.split("\n")))
    except Exception:  # a parser failure must not cost the mail: show the whole text
        return text.strip()
    visible = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines))
    return visible.strip() or text.strip()

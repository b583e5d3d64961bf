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

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from mailparser_reply.parser import GENERIC_MAIL_SEPARATOR, EmailMessage

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
_MARKER = re.compile(r"^[>* ]*[^:\n\d]{1,24}:|[:\uff1a]$|-----")
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


@dataclass(frozen=True, slots=True)
class _HeaderForm:
    """One quote-header form, and what a text must hold for it to match there."""

    regex: re.Pattern[str]
    needs: str = ""  # a character every match contains ("" = none known)


@dataclass(frozen=True, slots=True)
class _HeaderPattern:
    """Quote-header forms searched as one alternation, and how far below its first line a
    match's colon or rule can be (None: anywhere, so every position is searched)."""

    forms: tuple[_HeaderForm, ...]
    reach: int | None

    @lru_cache(maxsize=8)  # noqa: B019  # a handful of module-level instances, kept for life
    def regex_for(self, present: frozenset[str]) -> re.Pattern[str]:
        """The alternation of the forms that can match a text holding the ``present`` characters.
        A form that cannot match anywhere changes nothing in an alternation's result."""
        forms = [f for f in self.forms if not f.needs or f.needs in present]
        return re.compile("|".join(f.regex.pattern for f in forms), self.forms[0].regex.flags)

    def needed(self) -> frozenset[str]:
        return frozenset(f.needs for f in self.forms if f.needs)


# The Japanese, Chinese and Korean attribution forms begin with a look-ahead that scans the whole
# line for a date at every line start; they cost more than all other forms together and can only
# match a text holding their year character.
_YEAR_CHARACTER = {("ja", "wrote_header"): "\u5e74", ("zh", "wrote_header"): "\u5e74",
                   ("ko", "wrote_header"): "\ub144"}


@lru_cache(maxsize=1)
def _header_patterns() -> tuple[_HeaderPattern, ...]:
    """mail-parser-reply's quote-header forms for our languages, then ours.

    ``reach``: the parser's attribution forms ("Am ... schrieb ...:") allow a newline at four
    places at most; its header blocks have the colon on their first line, as does our
    date-and-address line.  Our Russian forms allow any white space, newlines included, before
    their colon.  The parser's forms are compiled one by one so that those a text cannot match
    are left out (checked against the parser's own regex, which is used whole if they differ).
    """
    parser = EmailMessage(text="", languages=list(LANGUAGES))
    joined = parser.HEADER_REGEX
    forms: list[_HeaderForm] = []
    for key in ("wrote_header", "from_header"):
        for language in LANGUAGES:
            form = parser._get_language_regex(language=language, regex_key=key)
            if form:
                needs = _YEAR_CHARACTER.get((language, key), "")
                forms.append(_HeaderForm(re.compile(form, joined.flags), needs))
    forms.append(_HeaderForm(re.compile(f"({GENERIC_MAIL_SEPARATOR})", joined.flags)))
    if "|".join(f.regex.pattern for f in forms) != joined.pattern:  # a new parser version
        forms = [_HeaderForm(joined)]
    russian_attribution, russian_block, date_and_address = _EXTRA_HEADERS
    return (
        _HeaderPattern(tuple(forms), reach=6),
        _HeaderPattern((_HeaderForm(russian_attribution),), reach=None),
        _HeaderPattern((_HeaderForm(russian_block),), reach=None),
        _HeaderPattern((_HeaderForm(date_and_address),), reach=0),
    )


def _marker_lines(lines: list[str]) -> list[bool]:
    """Lines that hold what every quote header holds: a colon (ASCII or full-width) that ends the
    line ("... wrote:") or follows a field name at its start ("From:", "> *Sent:*"; no field
    name of any language has a digit, so a pasted log line's "2024-03-04 22:08:50" is none), or
    a ``-----`` rule.  ``lines`` are stripped of white space at both ends."""
    return [bool(_MARKER.search(line)) for line in lines]


def _line_anchored_matches(pattern: _HeaderPattern, text: str, marked: list[int],
                           starts: list[int]) -> Iterator[re.Match[str]]:
    """What ``finditer`` of the pattern's alternation over ``text`` finds, at a fraction of the
    cost.

    Every quote-header form starts with ``^`` or a newline, so a match can only begin at a line
    start or on the newline before it, and it holds a marker line (``marked``: their indexes,
    see :func:`_marker_lines`) within ``reach`` lines.  Only those positions are tried
    (``match`` with ``pos`` keeps ``^`` seeing the whole text; ``starts`` are the lines'
    offsets); the matches are the same, leftmost first and non-overlapping.  Searching every
    position cost more than all the rest of the pipeline on a long history.  Nor are positions
    on quoted lines tried: :func:`_note_header` would drop a header there.  (The one
    difference: such a dropped match no longer hides an unquoted header that begins inside it.)
    """
    regex = pattern.regex_for(frozenset(c for c in pattern.needed() if c in text))
    if pattern.reach is None:
        yield from regex.finditer(text)
        return
    hopeful = sorted({line for marker in marked
                      for line in range(max(0, marker - pattern.reach), marker + 1)})
    end_of_last = 0
    for index in hopeful:
        position = starts[index]
        if text.startswith(">", position):
            continue
        for start in (position - 1, position) if index else (position,):
            if start < end_of_last:
                continue
            match = regex.match(text, start)
            if match is not None and match.end() > match.start():
                end_of_last = match.end()
                yield match


def _find_headers(lines: list[str]) -> dict[int, _Header]:
    """Quote headers by first line index, found on the lines stripped of indentation."""
    stripped_lines = [line.strip() for line in lines]
    stripped = "\n".join(stripped_lines)
    marked = [index for index, marker in enumerate(_marker_lines(stripped_lines)) if marker]
    starts = [0, *itertools.accumulate(len(line) + 1 for line in stripped_lines)]
    headers: dict[int, _Header] = {}
    for pattern in _header_patterns():
        for match in _line_anchored_matches(pattern, stripped, marked, starts):
            _note_header(headers, lines, stripped, match)
    return headers


def _note_header(headers: dict[int, _Header], lines: list[str], stripped: str,
                 match: re.Match[str]) -> None:
    text = match.group()
    if not text.strip():
        return
    lead = len(text) - len(text.lstrip())
    first = stripped.count("\n", 0, match.start() + lead)
    last = stripped.count("\n", 0, match.end() - (len(text) - len(text.rstrip())))
    if _QUOTED.match(lines[first]):
        return  # a header inside quoted history is history already
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

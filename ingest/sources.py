"""Mail sources for replay: single .eml files, directories of them, mbox files and Maildirs.

Sources are read lazily, one mail at a time, so replaying a multi-gigabyte mbox stays within
constant memory.  An unreadable item is yielded as an error instead of ending the iteration.
"""

from __future__ import annotations

import mailbox
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class SourceItem:
    label: str
    raw: bytes | None = None
    error: str | None = None


def _is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


# An mbox separator: "From " sender, then an asctime date ("From MAILER-DAEMON Fri Jul  5 10:00:00
# 2002").  A bare "From " prefix is not enough: old-style "From  : John" is a legal header line.
_MBOX_SEPARATOR = re.compile(
    rb"^From \S+\s+(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb"\s+\d{1,2} \d{1,2}:\d{2}(:\d{2})?"
)


def _first_line(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.readline(1000)
    except OSError:
        return b""


def _looks_like_mbox(path: Path) -> bool:
    """An mbox is a file that starts with a separator line and is not named ``*.eml``."""
    return path.suffix.lower() != ".eml" and bool(_MBOX_SEPARATOR.match(_first_line(path)))


def _from_maildir(path: Path) -> Iterator[SourceItem]:
    box = mailbox.Maildir(path, factory=None, create=False)
    for key in sorted(box.iterkeys()):
        try:
            yield SourceItem(f"{path}:{key}", box.get_bytes(key))
        except (OSError, KeyError) as exc:
            yield SourceItem(f"{path}:{key}", error=f"unreadable: {exc}")


def _from_mbox(path: Path) -> Iterator[SourceItem]:
    """The mails of an mbox, split only at separator lines (``_MBOX_SEPARATOR``: ``From ``, the
    sender and an asctime date).

    ``mailbox.mbox`` splits at every line that starts with ``From ``, and mboxo writers (and
    many hand-made files) leave a body line such as ``From my phone`` unescaped: one mail
    became two tickets, the first cut short.  The bytes of each mail are the ones
    ``mailbox.mbox`` gave for it otherwise (the separator line left out, and an empty LF line
    before the next separator or the end), so a mail without a Message-ID, known by its
    bytes' hash, is still a duplicate of the one an earlier replay stored.  (A separator is not
    required to follow an empty line: files joined with ``cat`` often lack it.)"""
    index = 0
    lines: list[bytes] = []
    try:
        with path.open("rb") as fh:
            for line in fh:
                if _MBOX_SEPARATOR.match(line):
                    if index:
                        yield SourceItem(f"{path}#{index}", _mbox_message(lines))
                    index += 1
                    lines = []
                else:
                    lines.append(line)
    except OSError as exc:
        yield SourceItem(f"{path}#{index or 1}", error=f"unreadable: {exc.strerror or exc}")
        return
    if index:
        yield SourceItem(f"{path}#{index}", _mbox_message(lines))


def _mbox_message(lines: list[bytes]) -> bytes:
    if lines and lines[-1] == b"\n":
        lines.pop()
    return b"".join(lines)


def _from_file(path: Path) -> Iterator[SourceItem]:
    if _looks_like_mbox(path):
        yield from _from_mbox(path)
        return
    try:
        raw = path.read_bytes()
        if _MBOX_SEPARATOR.match(raw[:1000]):  # an .eml saved with its mbox "From " line
            raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
        yield SourceItem(str(path), raw)
    except OSError as exc:
        yield SourceItem(str(path), error=f"unreadable: {exc.strerror or exc}")


def _from_directory(path: Path) -> Iterator[SourceItem]:
    """Every file below ``path`` in name order; Maildirs inside it are read as Maildirs."""
    for root, dirs, files in os.walk(path):
        here = Path(root)
        if _is_maildir(here):
            dirs.clear()
            yield from _from_maildir(here)
            continue
        dirs.sort()
        for name in sorted(files):
            yield from _from_file(here / name)


def iter_mails(paths: list[Path]) -> Iterator[SourceItem]:
    for path in paths:
        if not path.exists():
            yield SourceItem(str(path), error="no such file or directory")
        elif path.is_dir():
            yield from _from_directory(path)
        else:
            yield from _from_file(path)

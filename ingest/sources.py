"""Mail sources for replay: single .eml files, directories of them, mbox files and Maildirs.

Sources are read lazily, one mail at a time, so replaying a multi-gigabyte mbox stays within
constant memory.  An unreadable item is yielded as an error instead of ending the iteration.
"""

from __future__ import annotations

import mailbox
import os
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


def _looks_like_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(5)
    except OSError:
        return False
    return head == b"From "


def _from_maildir(path: Path) -> Iterator[SourceItem]:
    box = mailbox.Maildir(path, factory=None, create=False)
    for key in sorted(box.iterkeys()):
        try:
            yield SourceItem(f"{path}:{key}", box.get_bytes(key))
        except (OSError, KeyError) as exc:
            yield SourceItem(f"{path}:{key}", error=f"unreadable: {exc}")


def _from_mbox(path: Path) -> Iterator[SourceItem]:
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        for index, key in enumerate(box.iterkeys(), start=1):
            try:
                yield SourceItem(f"{path}#{index}", box.get_bytes(key, from_=False))
            except (OSError, KeyError) as exc:
                yield SourceItem(f"{path}#{index}", error=f"unreadable: {exc}")
    finally:
        box.close()


def _from_file(path: Path) -> Iterator[SourceItem]:
    if _looks_like_mbox(path):
        yield from _from_mbox(path)
        return
    try:
        yield SourceItem(str(path), path.read_bytes())
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

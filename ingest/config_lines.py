"""Where a key is written in a TOML file, so configuration errors can name the line.

``tomllib`` keeps no positions, and pydantic reports a location such as
``("mailbox", 0, "imap", "after")``.  :func:`key_lines` scans the TOML text once (it is only
called on text ``tomllib`` has already accepted) and maps every key path -- tables, arrays of
tables with their index, dotted keys, inline tables and array elements -- to the line where it
starts.  :func:`line_for` then finds the line of the longest known prefix of a location, so a
missing key points at its table and a bad list item at its element (or at least its key).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

Path = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_WS = " \t"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.n = len(text)
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.index: dict[Path, int] = {}
        self.arrays: dict[Path, int] = {}  # array-of-tables path -> number of elements so far

    # --- characters --------------------------------------------------------------------------
    def line(self) -> int:
        return bisect.bisect_left(self.newlines, self.i) + 1

    def peek(self, k: int = 1) -> str:
        return self.s[self.i : self.i + k]

    def skip(self, newlines: bool) -> None:
        """Skip blanks (and, with ``newlines``, line ends and comments)."""
        while self.i < self.n:
            c = self.s[self.i]
            if c in _WS or (newlines and c in "\r\n"):
                self.i += 1
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = self.n if end < 0 else end
            else:
                return

    def string(self) -> str:
        quote = self.s[self.i]
        if self.s.startswith(quote * 3, self.i):
            end = self.s.find(quote * 3, self.i + 3)
            while end >= 0 and quote == '"' and _escaped(self.s, end):
                end = self.s.find(quote * 3, end + 1)
            end = self.n if end < 0 else end
            while end + 3 < self.n and self.s[end + 3] == quote:  # """a"""" ends one later
                end += 1
            value, self.i = self.s[self.i + 3 : end], end + 3
            return value
        j = self.i + 1
        while j < self.n and self.s[j] != quote and self.s[j] != "\n":
            j += 2 if quote == '"' and self.s[j] == "\\" else 1
        value = self.s[self.i + 1 : j]
        self.i = j + 1
        if quote == '"' and "\\" in value:
            with contextlib.suppress(ValueError):
                value = json.loads(f'"{value}"')
        return value

    # --- grammar -----------------------------------------------------------------------------
    def key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self.skip(newlines=False)
            if self.peek() in ('"', "'"):
                parts.append(self.string())
            else:
                m = _BARE.match(self.s, self.i)
                if not m:
                    break
                parts.append(m.group())
                self.i = m.end()
            self.skip(newlines=False)
            if self.peek() != ".":
                break
            self.i += 1
        return parts

    def record(self, path: Path, line: int) -> None:
        self.index.setdefault(path, line)

    def value(self, path: Path) -> None:
        self.skip(newlines=False)
        c = self.peek()
        if c == "{":
            self.i += 1
            while self.i < self.n:
                self.skip(newlines=True)
                if self.peek() == "}":
                    self.i += 1
                    return
                if self.peek() == ",":
                    self.i += 1
                    continue
                line = self.line()
                key = self.key()
                if not key:
                    self.i += 1
                    continue
                self.skip(newlines=False)
                if self.peek() == "=":
                    self.i += 1
                for depth in range(1, len(key) + 1):
                    self.record((*path, *key[:depth]), line)
                self.value((*path, *key))
        elif c == "[":
            self.i += 1
            item = 0
            while self.i < self.n:
                self.skip(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                if self.peek() == ",":
                    self.i += 1
                    item += 1
                    continue
                self.record((*path, item), self.line())
                self.value((*path, item))
        elif c in ('"', "'"):
            self.string()
        else:  # number, boolean, date-time (which may hold one space)
            while self.i < self.n and self.s[self.i] not in ",]}#\r\n":
                self.i += 1

    def table_path(self, key: list[str], array: bool) -> Path:
        resolved: Path = ()
        for depth, name in enumerate(key, start=1):
            resolved = (*resolved, name)
            if depth == len(key) and array:
                count = self.arrays.get(resolved, 0)
                self.arrays[resolved] = count + 1
                resolved = (*resolved, count)
            elif resolved in self.arrays:  # [a.b] after [[a]] belongs to the last element of a
                resolved = (*resolved, self.arrays[resolved] - 1)
        return resolved

    def document(self) -> dict[Path, int]:
        current: Path = ()
        while True:
            self.skip(newlines=True)
            if self.i >= self.n:
                return self.index
            line = self.line()
            if self.peek() == "[":
                array = self.peek(2) == "[["
                self.i += 2 if array else 1
                key = self.key()
                self.skip(newlines=False)
                self.i += 2 if array else 1
                current = self.table_path(key, array)
                for depth in range(1, len(current) + 1):
                    self.record(current[:depth], line)
                continue
            key = self.key()
            if not key:  # not TOML we understand: go on at the next line
                end = self.s.find("\n", self.i)
                self.i = self.n if end < 0 else end + 1
                continue
            self.skip(newlines=False)
            if self.peek() == "=":
                self.i += 1
            for depth in range(1, len(key) + 1):
                self.record((*current, *key[:depth]), line)
            self.value((*current, *key))


def _escaped(s: str, pos: int) -> bool:
    backslashes = 0
    while pos - 1 - backslashes >= 0 and s[pos - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def key_lines(text: str) -> dict[Path, int]:
    """Every key path of a TOML document and its 1-based line number."""
    return _Scanner(text).document()


def line_for(index: dict[Path, int], loc: Sequence[str | int]) -> int | None:
    """The line of ``loc`` or of its longest prefix that is written in the file."""
    path = tuple(loc)
    for end in range(len(path), 0, -1):
        line = index.get(path[:end])
        if line is not None:
            return line
    return None


def dotted(loc: Sequence[str | int]) -> str:
    """``("mailbox", 0, "category")`` -> ``mailbox[0].category`` (how the TOML reads)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE.fullmatch(part) else f'"{part}"'
            out += f".{name}" if out else name
    return out or "(top level)"


_CROSS_REF = re.compile(r"^(?P<where>[\w.\[\]]+?)(?: \(.*\))?(?P<tail>(?:\.\w+)*): "
                        r"(?P<msg>(?:unknown|duplicate) (?P<kind>\w+).*)$")


def cross_reference_locations(message: str) -> list[tuple[Path, str]]:
    """Split the settings' own reference check (``mailbox[0] (Support): unknown category 'X'; ...``)
    into ``(location, message)`` pairs, so each can be given its line."""
    found: list[tuple[Path, str]] = []
    for part in message.split("; "):
        m = _CROSS_REF.match(part.strip())
        if not m:
            found.append(((), part.strip()))
            continue
        path: list[str | int] = []
        for name, index in re.findall(r"(\w+)(?:\[(\d+)\])?", m["where"] + m["tail"]):
            path.append(name)
            if index:
                path.append(int(index))
        if isinstance(path[-1], int) or path[-1] == "set":
            path.append(m["kind"])
        found.append((tuple(path), m["msg"]))
    return found


def _env_name(loc: Sequence[str | int]) -> str | None:
    """``TICKETGATE_X`` when that environment variable set the value at ``loc`` (env wins)."""
    if loc and isinstance(loc[0], str):
        name = f"TICKETGATE_{loc[0].upper()}"
        if name in os.environ:
            return name
    return None


def _message(error: Mapping[str, Any]) -> str:
    if error.get("type") == "extra_forbidden":
        return "unknown key (misspelt, or not valid in this table)"
    msg = str(error.get("msg", ""))
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def problems(errors: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int | None, str, str,
                                                                            str | None]]:
    """``(line, key, message, env)`` for each pydantic error, in the order pydantic gives them."""
    index = key_lines(text) if text else {}
    found: list[tuple[int | None, str, str, str | None]] = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        message = _message(error)
        pairs = cross_reference_locations(message) if not loc else [(loc, message)]
        for where, msg in pairs:
            env = _env_name(where)
            line = None if env else line_for(index, where)
            found.append((line, dotted(where), msg, env))
    return found


def describe_errors(exc: Any, source: str, text: str) -> str:
    """A pydantic ``ValidationError`` as ``FILE:LINE: key: message`` lines (``$VAR`` instead of
    ``FILE:LINE`` for a value that came from the environment)."""
    lines = []
    found = problems(exc.errors(), text)
    for line, key, msg, env in sorted(found, key=lambda p: (p[0] is None, p[0] or 0)):
        origin = f"${env}" if env else f"{source}:{line}" if line else source
        lines.append(f"{origin}: {key}: {msg}")
    return "\n".join(lines)

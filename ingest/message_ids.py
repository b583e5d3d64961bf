"""Message-IDs as header values carry them: ``<id@host>``, or bare, or several in a list.

A module of its own so that the spool (and with it the SMTP listener) can read the Message-ID
without importing the parser and its libraries.
"""

from __future__ import annotations

import re

_MSGID_RE = re.compile(r"<([^<>\s]+)>")
MAX_MESSAGE_ID = 900


def message_ids_in(value: str) -> list[str]:
    """Message-IDs from In-Reply-To/References, tolerant of missing angle brackets."""
    if not value:
        return []
    found = _MSGID_RE.findall(value)
    if not found:
        found = [tok.strip("<>") for tok in value.split() if "@" in tok]
    return [f for f in found if f]


def normalize_message_id(value: str | None) -> str | None:
    """The first id of a Message-ID header value, without angle brackets; None when empty."""
    if not value:
        return None
    ids = message_ids_in(str(value))
    if ids:
        return ids[0][:MAX_MESSAGE_ID]
    cleaned = str(value).strip().strip("<>").strip()
    return cleaned[:MAX_MESSAGE_ID] or None

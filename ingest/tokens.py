"""Ticket references that travel in mail: the subject tag, the ticket number, and the signed
Message-ID ticketgate gives its own outgoing mail.

The signed Message-ID (``tg.<ticket>.<unique>.<mac>@domain``) is evidence no outsider can forge:
the MAC is an HMAC-SHA256 over ticket id and unique part with ``service.secret``.  osTicket does
the same; plain "any known Message-ID" matching is kept beside it for mail from other systems.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from functools import lru_cache

TICKET_NUMBER_RE = re.compile(r"\bT(\d{8})\.(\d{4,})\b")
_TOKEN_RE = re.compile(r"^tg\.(\d+)\.([0-9a-z]+)\.([0-9a-f]{16})@(.+)$")


@lru_cache(maxsize=16)
def subject_tag_pattern(template: str) -> re.Pattern[str]:
    before, _, after = template.partition("{id}")
    return re.compile(re.escape(before) + r"(\d{1,9})" + re.escape(after))


def subject_tag(template: str, ticket_id: int) -> str:
    return template.replace("{id}", str(ticket_id))


def tagged_ticket_ids(subject: str, template: str) -> list[int]:
    return [int(m) for m in subject_tag_pattern(template).findall(subject)]


def ticket_numbers(subject: str) -> list[str]:
    return [f"T{day}.{seq}" for day, seq in TICKET_NUMBER_RE.findall(subject)]


def _mac(secret: str, ticket_id: int, unique: str) -> str:
    return hmac.new(secret.encode(), f"{ticket_id}.{unique}".encode(), hashlib.sha256).hexdigest()[
        :16
    ]


def outgoing_message_id(ticket_id: int, secret: str, domain: str) -> str:
    unique = secrets.token_hex(6)
    return f"tg.{ticket_id}.{unique}.{_mac(secret, ticket_id, unique)}@{domain}"


def ticket_from_message_id(message_id: str, secret: str, domain: str) -> int | None:
    """The ticket id inside one of our signed Message-IDs, or None if absent or forged."""
    match = _TOKEN_RE.match(message_id)
    if not match or match.group(4).lower() != domain.lower():
        return None
    ticket_id, unique, mac = int(match.group(1)), match.group(2), match.group(3)
    return ticket_id if hmac.compare_digest(mac, _mac(secret, ticket_id, unique)) else None

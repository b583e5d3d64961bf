"""TNEF (winmail.dat) unpacking.

Outlook sends rich-text mail as one opaque ``winmail.dat``; a support agent needs the files inside
it.  tnefparse decodes the container; this module bounds the work (hostile input can declare huge
object counts) and turns the result into ordinary attachments.  When decoding fails the original
part is kept as it is, so nothing is lost.
"""

from __future__ import annotations

import mimetypes
from typing import TYPE_CHECKING

from tnefparse import TNEF

if TYPE_CHECKING:
    from ingest.parse import ParsedAttachment

MAX_TNEF_ATTACHMENTS = 100
MAX_TNEF_BYTES = 50 * 1024 * 1024


def is_tnef(content_type: str, filename: str) -> bool:
    return content_type in ("application/ms-tnef", "application/vnd.ms-tnef") or (
        filename.lower() == "winmail.dat"
    )


def unpack(data: bytes) -> list[ParsedAttachment] | None:
    """The files inside a TNEF blob, plus its text body as a ``tnef-body`` pseudo-attachment.

    Returns ``None`` when the blob is not valid TNEF, holds nothing, or exceeds the limits; the
    caller then keeps the raw ``winmail.dat``.
    """
    from ingest.parse import ParsedAttachment, safe_filename

    if len(data) > MAX_TNEF_BYTES:
        return None
    try:
        container = TNEF(data, do_checksum=False)
    except Exception:
        return None
    if len(container.attachments) > MAX_TNEF_ATTACHMENTS:
        return None
    found: list[ParsedAttachment] = []
    for index, item in enumerate(container.attachments, start=1):
        try:
            name = item.long_filename() or item.name
        except Exception:
            name = getattr(item, "name", "") or ""
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        name = safe_filename(str(name).strip("\x00")) if name else f"tnef-attachment-{index}.bin"
        payload = getattr(item, "data", b"") or b""
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        found.append(ParsedAttachment(name, ctype, payload, origin="tnef"))
    body = container.body
    if body:
        raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
        found.append(ParsedAttachment("body.txt", "text/plain", raw, origin="tnef-body"))
    return found or None  # nothing inside: keep the raw winmail.dat rather than lose it

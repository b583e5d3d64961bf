"""Refuse mail over the configured size before spending any parsing on it."""

from __future__ import annotations

from ingest.context import MailContext, Outcome


def enforce_size(ctx: MailContext) -> Outcome | None:
    limit = ctx.settings.service.max_message_bytes
    size = len(ctx.raw)
    if size > limit:
        reason = f"too large: {size} bytes, the limit is {limit}"
        ctx.trace.add("limits", reason)
        return Outcome("rejected", reason)
    ctx.trace.add("limits", f"{size} bytes")
    return None

"""lz4 for the large columns on PostgreSQL: the mail bytes, bodies, traces and attachments

PostgreSQL compresses values over about 2 kB before it stores them (TOAST), with pglz unless
told otherwise.  Every mail writes its raw bytes and its bodies once, so that compression ran
for every mail: in bench/ it cost about 0.45 ms of server CPU per generated mail with pglz
against 0.2 ms with lz4, which also compressed them slightly smaller.  Values already stored
keep their compression; new ones use lz4.  Needs PostgreSQL 14 built with lz4 (Debian's and
the official images are); elsewhere, and on SQLite, this migration changes nothing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

LARGE_COLUMNS = {
    "inbound_mails": ("raw", "trace", "result"),
    "messages": ("headers", "body_text", "visible_text", "body_html"),
    "attachments": ("data",),
    "tickets": ("description",),
}


def _lz4_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    # Listed among the setting's values only when the server was built with lz4 (PG 14+).
    found = bind.execute(text(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
        " AND 'lz4' = ANY(enumvals)")).first()
    return found is not None


def _set_compression(method: str) -> None:
    for table, columns in LARGE_COLUMNS.items():
        for column in columns:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    if _lz4_available():
        _set_compression("lz4")


def downgrade() -> None:
    if _lz4_available():
        _set_compression("pglz")

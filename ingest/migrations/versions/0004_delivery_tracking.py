"""delivery tracking: when a record was last handed to the broker; index on Message-ID

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_mails") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(), nullable=True))
        batch.create_index("ix_inbound_header_message_id", ["header_message_id"])


def downgrade() -> None:
    with op.batch_alter_table("inbound_mails") as batch:
        batch.drop_index("ix_inbound_header_message_id")
        batch.drop_column("enqueued_at")

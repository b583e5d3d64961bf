"""arrival time: the circuit breaker counts when mail arrived, not when it was processed

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_mails") as batch:
        batch.add_column(sa.Column("arrived_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("arrived_at", sa.DateTime(), nullable=True))
    op.execute("UPDATE messages SET arrived_at = created_at")
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_from_created")
        batch.create_index("ix_messages_from_arrived", ["from_address", "arrived_at"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_from_arrived")
        batch.create_index("ix_messages_from_created", ["from_address", "created_at"])
        batch.drop_column("arrived_at")
    with op.batch_alter_table("inbound_mails") as batch:
        batch.drop_column("arrived_at")

"""sender authentication on messages and tickets; circuit breaker columns

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('auth_verdict', sa.String(length=20), nullable=True))
        batch.add_column(sa.Column('authentication', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('unverified', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column('subject_key', sa.String(length=64), nullable=True))
        batch.create_index('ix_messages_from_created', ['from_address', 'created_at'])
    with op.batch_alter_table('tickets') as batch:
        batch.add_column(sa.Column('unverified', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('tickets') as batch:
        batch.drop_column('unverified')
    with op.batch_alter_table('messages') as batch:
        batch.drop_index('ix_messages_from_created')
        batch.drop_column('subject_key')
        batch.drop_column('unverified')
        batch.drop_column('authentication')
        batch.drop_column('auth_verdict')

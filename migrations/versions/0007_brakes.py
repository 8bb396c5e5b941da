"""brakes against card testing

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 20:10:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from plumbing import db

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('brake_hits',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('at', db.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_brake_hits'))
    )
    with op.batch_alter_table('brake_hits', schema=None) as batch_op:
        batch_op.create_index('ix_brake_hits_at', ['at'], unique=False)
        batch_op.create_index('ix_brake_hits_key_at', ['key', 'at'], unique=False)

    op.create_table('brake_trips',
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('window_start', db.UTCDateTime(), nullable=False),
    sa.Column('tripped_at', db.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'window_start', name=op.f('pk_brake_trips'))
    )


def downgrade() -> None:
    op.drop_table('brake_trips')
    with op.batch_alter_table('brake_hits', schema=None) as batch_op:
        batch_op.drop_index('ix_brake_hits_key_at')
        batch_op.drop_index('ix_brake_hits_at')

    op.drop_table('brake_hits')

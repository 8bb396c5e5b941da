"""mail that survives outages, no links stored

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 20:10:00

- outbox.requeued_at: `outbox retry` restarts a message's OUTBOX_GIVE_UP_AFTER_HOURS from there.
- ix_outbox_created_at: the hourly purge of old bodies (OUTBOX_KEEP_DAYS) reads by age.
- Messages that carry a link are now queued as facts (link id and expiry) and rendered when sent.
  The bodies already stored with a link in plaintext (invoice, new link, reminder, address
  confirmation) are emptied once they are sent or dead: their record (recipient, subject, status,
  Message-ID, dates) stays. Pending ones keep their body, so they are still delivered; they are
  emptied by the purge after OUTBOX_KEEP_DAYS. Emptied bodies cannot come back on downgrade.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from plumbing import db

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LINK_KINDS = ('invoice', 'new_link', 'reminder', 'verification')


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('requeued_at', db.UTCDateTime(), nullable=True))
        batch_op.create_index('ix_outbox_created_at', ['created_at'], unique=False)

    outbox = sa.table(
        'outbox',
        sa.column('kind', sa.String()),
        sa.column('status', sa.String()),
        sa.column('text', sa.Text()),
        sa.column('html', sa.Text()),
        sa.column('payload', sa.JSON()),
    )
    op.execute(
        outbox.update()
        .where(outbox.c.kind.in_(LINK_KINDS), outbox.c.status.in_(('sent', 'dead')), outbox.c.payload.is_(None))
        .values(text='', html='')
    )


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_created_at')
        batch_op.drop_column('requeued_at')

"""line items, notes, void reason

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 20:45:00

- invoices.line_items (JSON) exists since 0001; from this release every new invoice fills it
  (links/lines.py). Older invoices keep NULL and read as one untaxed line.
- invoices.notes: invoice-level notes shown to the customer (`invoice create --notes`, CSV `notes`).
- invoices.void_reason: why finance voided it (`invoice void N --reason`), also in the audit log.
- ix_invoices_due_date: `invoice list --overdue` and the reminder schedule look invoices up by due date.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('notes', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('void_reason', sa.Text(), nullable=True))
        batch_op.create_index('ix_invoices_due_date', ['due_date'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.drop_index('ix_invoices_due_date')
        batch_op.drop_column('void_reason')
        batch_op.drop_column('notes')

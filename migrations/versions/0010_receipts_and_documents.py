"""receipt numbers and documents

- payments.receipt_number: RCT-000042, unique; gap-free from the number_sequences row 'receipt',
  bumped with UPDATE ... RETURNING in the transaction that marks a payment succeeded
  (payments/documents.py). Payments that succeeded before this release are numbered here, in the
  order they succeeded.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 20:45:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('receipt_number', sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_payments_receipt_number'), ['receipt_number'])
    connection = op.get_bind()
    paid = connection.execute(
        sa.text(
            "SELECT p.id FROM payments p JOIN invoices i ON i.id = p.invoice_id "
            "WHERE p.status = 'succeeded' AND p.currency = i.currency ORDER BY p.succeeded_at, p.created_at"
        )
    ).scalars().all()
    for number, payment_id in enumerate(paid, start=1):
        connection.execute(
            sa.text("UPDATE payments SET receipt_number = :n WHERE id = :id"), {"n": f"RCT-{number:06d}", "id": payment_id}
        )
    connection.execute(sa.text("INSERT INTO number_sequences (name, last_value) VALUES ('receipt', :v)"), {"v": len(paid)})


def downgrade() -> None:
    op.get_bind().execute(sa.text("DELETE FROM number_sequences WHERE name = 'receipt'"))
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_payments_receipt_number'), type_='unique')
        batch_op.drop_column('receipt_number')

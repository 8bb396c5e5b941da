"""finance data: invoice numbering, imports

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 20:10:00

- number_sequences: the counter row behind gap-free invoice numbers (INV-000042), seeded from the
  highest INV- number already in use, so numbering carries on where `count(*)+1` left it.
- import_batches, invoices.import_batch_id, customers.import_batch_id: imports are written in short
  transactions; a failed one is undone by its batch id.
- invoices.import_key: rows imported without a number are found again by their contents (it used
  to be their number, IMP-…; those invoices keep that number and get it as their key too).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from plumbing import db

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INV_NUMBER = re.compile(r"INV-(\d+)")


def upgrade() -> None:
    op.create_table('number_sequences',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('last_value', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_number_sequences'))
    )
    op.create_table('import_batches',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=500), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('first_number', sa.Integer(), nullable=True),
    sa.Column('last_number', sa.Integer(), nullable=True),
    sa.Column('started_at', db.UTCDateTime(), nullable=False),
    sa.Column('heartbeat_at', db.UTCDateTime(), nullable=False),
    sa.Column('finished_at', db.UTCDateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_import_batches'))
    )
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('import_batch_id', sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f('ix_customers_import_batch_id'), ['import_batch_id'], unique=False)
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('import_key', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('import_batch_id', sa.Uuid(), nullable=True))
        batch_op.create_index('ix_invoices_import_batch_id', ['import_batch_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_invoices_import_key'), ['import_key'])

    connection = op.get_bind()
    numbers = connection.execute(sa.text("SELECT number FROM invoices WHERE number LIKE 'INV-%'")).scalars()
    highest = max((int(m.group(1)) for n in numbers if (m := INV_NUMBER.fullmatch(n))), default=0)
    connection.execute(sa.text("INSERT INTO number_sequences (name, last_value) VALUES ('invoice', :v)"), {"v": highest})
    connection.execute(sa.text("UPDATE invoices SET import_key = number WHERE number LIKE 'IMP-%' AND length(number) <= 32"))


def downgrade() -> None:
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_invoices_import_key'), type_='unique')
        batch_op.drop_index('ix_invoices_import_batch_id')
        batch_op.drop_column('import_batch_id')
        batch_op.drop_column('import_key')
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_customers_import_batch_id'))
        batch_op.drop_column('import_batch_id')
    op.drop_table('import_batches')
    op.drop_table('number_sequences')

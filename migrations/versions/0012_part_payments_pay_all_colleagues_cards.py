"""part payments, pay-all allocations, colleague links, card fingerprints (issue 13)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-23 22:50:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from plumbing import db

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("allow_partial", sa.Boolean(), server_default="0", nullable=False))
        batch.add_column(sa.Column("min_partial_amount", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("min_partial_percent", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("deposit_percent", sa.Integer(), nullable=True))
    with op.batch_alter_table("payment_links") as batch:
        batch.add_column(sa.Column("recipient_email", sa.String(length=320), nullable=True))
        batch.add_column(sa.Column("stripe_customer_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(length=200), nullable=True))
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("scope", sa.String(length=16), server_default="invoice", nullable=False))
        batch.add_column(sa.Column("link_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(op.f("fk_payments_link_id_payment_links"), "payment_links", ["link_id"], ["id"])
    with op.batch_alter_table("payment_profiles") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=True))
    op.create_table(
        "payment_allocations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("payment_id", sa.Uuid(), nullable=False),
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("amount_refunded", sa.Integer(), nullable=False),
        sa.Column("live_invoice_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["payment_id"], ["payments.id"], name=op.f("fk_payment_allocations_payment_id_payments")),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"], name=op.f("fk_payment_allocations_invoice_id_invoices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_allocations")),
        sa.UniqueConstraint("live_invoice_id", name=op.f("uq_payment_allocations_live_invoice_id")),
    )
    op.create_index("ix_payment_allocations_payment_id", "payment_allocations", ["payment_id"])
    op.create_index("ix_payment_allocations_invoice_id", "payment_allocations", ["invoice_id"])


def downgrade() -> None:
    op.drop_index("ix_payment_allocations_invoice_id", table_name="payment_allocations")
    op.drop_index("ix_payment_allocations_payment_id", table_name="payment_allocations")
    op.drop_table("payment_allocations")
    with op.batch_alter_table("payment_profiles") as batch:
        batch.drop_column("fingerprint")
    with op.batch_alter_table("payments") as batch:
        batch.drop_constraint(op.f("fk_payments_link_id_payment_links"), type_="foreignkey")
        batch.drop_column("link_id")
        batch.drop_column("scope")
    with op.batch_alter_table("payment_links") as batch:
        batch.drop_column("created_by")
        batch.drop_column("stripe_customer_id")
        batch.drop_column("recipient_email")
    with op.batch_alter_table("invoices") as batch:
        batch.drop_column("deposit_percent")
        batch.drop_column("min_partial_percent")
        batch.drop_column("min_partial_amount")
        batch.drop_column("allow_partial")

"""link_opens.opens: one row per link, flush and minute, holding how many opens it counts

A page refreshed again and again (or a leaked link hammered) wrote one row per request: thousands a
second per worker, the table growing without bound until LINK_OPENS_KEEP_DAYS. Existing rows count 1.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24 09:40:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("link_opens") as batch:
        batch.add_column(sa.Column("opens", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("link_opens") as batch:
        batch.drop_column("opens")

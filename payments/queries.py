"""Read-only questions finance asks about payments: a customer's saved cards, an invoice's attempts."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from payments.models import Payment, PaymentProfile


async def saved_cards(session: AsyncSession, customer_id: uuid.UUID) -> list[PaymentProfile]:
    """The customer's saved payment profiles, in the order they were saved (the default is marked)."""
    query = select(PaymentProfile).where(PaymentProfile.customer_id == customer_id).order_by(PaymentProfile.created_at, PaymentProfile.id)
    return list((await session.execute(query)).scalars())


async def invoice_payments(session: AsyncSession, invoice_id: uuid.UUID) -> list[Payment]:
    """Every payment attempt on the invoice, oldest first, whatever its status."""
    query = select(Payment).where(Payment.invoice_id == invoice_id).order_by(Payment.created_at)
    return list((await session.execute(query)).scalars())

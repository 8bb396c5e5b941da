"""A link's life after it is issued: revoke, void. (Expiry is in the token; opens in links/opens.py.)"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

import audit
from db import utcnow
from links.models import Invoice, InvoiceStatus, PaymentLink
from links.service import LinkError, find_invoice
from payments.models import Payment


async def revoke_links(session: AsyncSession, number: str, *, actor: str) -> int:
    """Revoke every live link of an invoice. Returns how many were revoked."""
    invoice = await find_invoice(session, number)
    now = utcnow()
    result = await session.execute(
        update(PaymentLink)
        .where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None), PaymentLink.expires_at > now)
        .values(revoked_at=now)
    )
    count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    audit.record(session, actor, "link.revoke", f"invoice:{invoice.number}", count=count)
    return count


async def void_invoice(session: AsyncSession, number: str, *, actor: str) -> Invoice:
    invoice = await find_invoice(session, number)
    if invoice.status != InvoiceStatus.OPEN:
        raise LinkError(f"invoice {invoice.number} is {invoice.status}; only open invoices can be voided")
    live = (await session.execute(select(Payment.id).where(Payment.live_invoice_id == invoice.id))).first()
    if live is not None:
        raise LinkError(f"invoice {invoice.number} has a payment in progress; run `python -m links reconcile` first")
    invoice.status = InvoiceStatus.VOID
    now = utcnow()
    await session.execute(
        update(PaymentLink).where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None)).values(revoked_at=now)
    )
    audit.record(session, actor, "invoice.void", f"invoice:{invoice.number}")
    return invoice

"""The "email me a new link" request of an expired link's page: a fresh link to the address on file (a
colleague's link: to that colleague), within rate limits kept in the database."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import Kind
from links.colleagues import issue_colleague_link
from links.issuing import issue_link, link_with_invoice, send_block_reason
from links.models import Invoice, InvoiceStatus, LinkRequest
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings

FRESH_LINKS_PER_INVOICE_PER_HOUR = 3


FRESH_LINKS_PER_CUSTOMER_PER_DAY = 5


async def request_fresh_link(session: AsyncSession, settings: Settings, link_id: uuid.UUID) -> bool:
    """Send a fresh link to the address on file (a colleague's link: to that colleague), within the
    rate limits. Returns whether one went out.

    The caller answers the customer the same way either way. Requests are stored, so the limits
    hold across restarts and across web processes."""
    row = (await session.execute(link_with_invoice(link_id))).one_or_none()
    if row is None:
        return False
    link, invoice, customer = row
    # Lock the invoice while counting (PostgreSQL; SQLite writers are serialised already), so that
    # simultaneous requests cannot all see "fewer than 3" and all send.
    await session.get_one(Invoice, invoice.id, with_for_update=True, populate_existing=True)
    now = utcnow()
    request = LinkRequest(invoice_id=invoice.id, customer_id=customer.id, requested_at=now, sent=False)
    session.add(request)
    if link.revoked_at is not None or invoice.status not in InvoiceStatus.PAYABLE:
        return False
    if link.recipient_email is None and send_block_reason(customer) is not None:
        return False
    per_invoice = await _sent_requests(session, LinkRequest.invoice_id == invoice.id, now - timedelta(hours=1))
    per_customer = await _sent_requests(session, LinkRequest.customer_id == customer.id, now - timedelta(days=1))
    if per_invoice >= FRESH_LINKS_PER_INVOICE_PER_HOUR or per_customer >= FRESH_LINKS_PER_CUSTOMER_PER_DAY:
        audit.record(session, "link", "link.fresh_refused", f"invoice:{invoice.number}", reason="rate limit")
        return False
    if link.recipient_email is not None:
        # A colleague's expired link: the fresh one goes to the colleague, never to the customer.
        recipient = link.recipient_email
        await issue_colleague_link(
            session, settings, invoice=invoice, customer=customer, recipient_email=recipient, actor="link", asked_by_customer=False
        )
    else:
        await issue_link(session, settings, invoice=invoice, customer=customer, actor="link", kind=Kind.NEW_LINK)
    request.sent = True
    return True


async def _sent_requests(session: AsyncSession, condition: Any, since: datetime) -> int:
    query = select(func.count()).select_from(LinkRequest).where(condition, LinkRequest.sent.is_(True), LinkRequest.requested_at > since)
    return int((await session.execute(query)).scalar_one())

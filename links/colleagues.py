"""Colleague links (issue 13, "a link for accounts payable"): the invoice sent to someone other than
the customer, usually whoever pays the company's bills, with a link of their own.

Finance sends one from the CLI (`link issue N --to ap@customer.example`); the customer from their pay
page ("Send this invoice to a colleague"). The colleague's link is the proof of their address (only
whoever reads that mailbox can open it), so no verification is asked; the email still goes through
the outbox like every other. Such a link never offers or charges the customer's saved cards, never
shows their other invoices and cannot itself send the invoice on (payments/payers.py decides who
pays through a link). From the page, sends are limited per invoice and per customer and day
(COLLEAGUE_LINKS_PER_INVOICE_DAY, COLLEAGUE_LINKS_PER_CUSTOMER_DAY), counted from the links
themselves under the customer row lock; the page answers the same whether or not one went out.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import EmailContent, Kind, colleague_payload, pay_link_url
from links.customers import customer_locale, normalize_email
from links.errors import LinkError
from links.hooks import queue_recipient_email
from links.invoices import invoice_facts
from links.issuing import IssuedLink, link_with_invoice, new_link
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings

PAGE_ACTOR_PREFIX = "link:"  # created_by of a colleague link sent from a pay page: "link:<sender link hex>"


def is_colleague_link(link: PaymentLink) -> bool:
    return link.recipient_email is not None


async def issue_colleague_link(
    session: AsyncSession,
    settings: Settings,
    *,
    invoice: Invoice,
    customer: Customer,
    recipient_email: str,
    actor: str,
    asked_by_customer: bool,
    ttl_days: int | None = None,
) -> IssuedLink:
    """A link of their own for `recipient_email`, emailed in this transaction; audited."""
    recipient = normalize_email(recipient_email)
    link = new_link(session, settings, invoice, ttl_days=ttl_days, actor=actor, recipient_email=recipient)
    subject, payload = colleague_payload(
        invoice_facts(settings, invoice, customer),
        link_id=link.id,
        expires_at=link.expires_at,
        locale=customer_locale(settings, customer),
        asked_by_customer=asked_by_customer,
    )
    content = EmailContent(Kind.COLLEAGUE_INVOICE, subject, "", "")
    emailed = await queue_recipient_email(session, settings, recipient, content, actor=actor, payload=payload, invoice_id=invoice.id)
    if emailed:
        link.sent_at = link.created_at
    audit.record(session, actor, "link.colleague", f"invoice:{invoice.number}", link=str(link.id), to=recipient, emailed=emailed)
    held = None if emailed else "the address is paused (mail to it failed permanently)"
    return IssuedLink(link.id, pay_link_url(settings, link.id, link.expires_at), link.expires_at, emailed, held)


async def send_from_page(session: AsyncSession, settings: Settings, sender_link_id: uuid.UUID, recipient_email: str) -> bool:
    """The customer's "send this invoice to a colleague": a colleague link goes to `recipient_email`
    if the sender's link is the customer's own and live, the invoice is payable and the limits allow.
    Returns whether one went out; the page answers the same either way (the caller checked the
    address's syntax: a typo is the customer's to fix, and tells nothing)."""
    recipient = normalize_email(recipient_email)
    row = (await session.execute(link_with_invoice(sender_link_id))).one_or_none()
    if row is None:
        return False
    sender, invoice, customer = row
    # Lock the customer while counting (PostgreSQL; SQLite writers are serialised already), so that
    # simultaneous sends, from one page or from several of their invoices, cannot all see "fewer than
    # the limit" and all send. (The customer, not the invoice: a payment claim locks the invoice.)
    await session.get_one(Customer, customer.id, with_for_update=True, populate_existing=True)
    now = utcnow()
    if (
        is_colleague_link(sender)
        or sender.revoked_at is not None
        or sender.expires_at <= now
        or invoice.status not in InvoiceStatus.PAYABLE
    ):
        return False
    since = now - timedelta(days=1)
    per_invoice = await _sent_from_pages(session, since, Invoice.id == invoice.id)
    per_customer = await _sent_from_pages(session, since, Invoice.customer_id == customer.id)
    if per_invoice >= settings.colleague_links_per_invoice_day or per_customer >= settings.colleague_links_per_customer_day:
        audit.record(session, "link", "link.colleague_refused", f"invoice:{invoice.number}", reason="rate limit", to=recipient)
        return False
    await issue_colleague_link(
        session,
        settings,
        invoice=invoice,
        customer=customer,
        recipient_email=recipient,
        actor=f"{PAGE_ACTOR_PREFIX}{sender.id.hex}",
        asked_by_customer=True,
    )
    return True


async def _sent_from_pages(session: AsyncSession, since: Any, condition: Any) -> int:
    query = (
        select(func.count())
        .select_from(PaymentLink)
        .join(Invoice, Invoice.id == PaymentLink.invoice_id)
        .where(
            condition,
            PaymentLink.recipient_email.is_not(None),
            PaymentLink.created_by.startswith(PAGE_ACTOR_PREFIX),
            PaymentLink.created_at > since,
        )
    )
    return int((await session.execute(query)).scalar_one())


def check_recipient(value: str | None) -> str:
    """The colleague's address from a form or the command line, trimmed and lower-cased; LinkError if malformed."""
    if not value or len(value) > 320:
        raise LinkError("an email address is needed, like ap@example.com")
    return normalize_email(value)

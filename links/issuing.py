"""Payment links: issue, resolve, revoke, release held ones, and "email me a new link".

A link is a bearer credential: its token is signed in plumbing/signing.py and never stored, not
even in the email that carries it: the outbox holds the link's id and expiry, and the worker builds
the URL when it sends the message (emails.messages.invoice_payload). The caller owns the
transaction, so a link and the email that carries it commit together.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import EmailContent, Kind, invoice_payload, pay_link_url
from links.customers import customer_locale, normalize_email
from links.errors import LinkError
from links.hooks import paused_reason, queue_customer_email
from links.invoices import find_invoice, invoice_facts
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings


@dataclass(frozen=True)
class IssuedLink:
    link_id: uuid.UUID
    url: str
    expires_at: datetime
    emailed: bool  # False when the email is held (unverified or paused address) or not asked for
    held_reason: str | None


async def issue_link(
    session: AsyncSession,
    settings: Settings,
    *,
    invoice: Invoice,
    customer: Customer,
    actor: str,
    ttl_days: int | None = None,
    send: bool = True,
    kind: str = Kind.INVOICE,
    audited: bool = True,
) -> IssuedLink:
    """Create a signed link for the invoice and, if asked, queue its email in this transaction.

    `audited=False` is for bulk callers that write one audit entry for the whole operation."""
    link = new_link(session, settings, invoice, ttl_days=ttl_days, actor=actor)
    now, expires_at = link.created_at, link.expires_at
    url = pay_link_url(settings, link.id, expires_at)  # for the caller (the CLI prints it); never stored
    held = send_block_reason(customer) if send else None
    emailed = False
    if send and held is None:
        emailed = _queue_link_email(session, settings, invoice, customer, link, actor=actor, kind=kind)
        if emailed:
            link.sent_at = now
    if audited:
        audit.record(session, actor, "link.issue", f"invoice:{invoice.number}", link=str(link.id), emailed=emailed, held=held)
    return IssuedLink(link.id, url, expires_at, emailed, held)


def new_link(
    session: AsyncSession, settings: Settings, invoice: Invoice, *, ttl_days: int | None, actor: str, recipient_email: str | None = None
) -> PaymentLink:
    """A new link row for a payable invoice (the customer's, or a colleague's with `recipient_email`)."""
    if invoice.status not in InvoiceStatus.PAYABLE:
        raise LinkError(f"invoice {invoice.number} is {invoice.status}; links are issued only for open invoices")
    ttl = ttl_days if ttl_days is not None else settings.link_ttl_days
    if not 1 <= ttl <= 365:
        raise LinkError("a link lives between 1 and 365 days")
    now = utcnow()
    # Whole seconds: the expiry in the token and in the database must be the same instant.
    expires_at = (now + timedelta(days=ttl)).replace(microsecond=0)
    link = PaymentLink(
        id=uuid.uuid4(), invoice_id=invoice.id, expires_at=expires_at, created_at=now, recipient_email=recipient_email, created_by=actor
    )
    session.add(link)
    return link


def _queue_link_email(
    session: AsyncSession, settings: Settings, invoice: Invoice, customer: Customer, link: PaymentLink, *, actor: str, kind: str
) -> bool:
    """Queue the email that carries `link`, as facts: the URL is built when it is sent."""
    subject, payload = invoice_payload(
        invoice_facts(settings, invoice, customer),
        link_id=link.id,
        expires_at=link.expires_at,
        locale=customer_locale(settings, customer),
        kind=kind,
    )
    content = EmailContent(kind, subject, "", "")
    return queue_customer_email(session, settings, customer, content, actor=actor, payload=payload, invoice_id=invoice.id)


def send_block_reason(customer: Customer) -> str | None:
    """Why an invoice email must not go to this customer now, or None when it may."""
    if customer.email_verified_at is None:
        return "email address not verified"
    return paused_reason(customer)


def link_with_invoice(link_id: uuid.UUID) -> Select[PaymentLink, Invoice, Customer]:
    """A link with its invoice and customer: one indexed read."""
    return (
        select(PaymentLink, Invoice, Customer)
        .join(Invoice, Invoice.id == PaymentLink.invoice_id)
        .join(Customer, Customer.id == Invoice.customer_id)
        .where(PaymentLink.id == link_id)
    )


@dataclass(frozen=True)
class Revoked:
    invoice: str
    status: str  # the invoice's: a paid invoice's link still shows its receipt
    count: int


async def revoke_links(session: AsyncSession, number: str, *, actor: str, recipient_email: str | None = None) -> Revoked:
    """Revoke every live link of an invoice, or only those sent to the colleague `recipient_email`."""
    invoice = await find_invoice(session, number)
    now = utcnow()
    live = [PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None), PaymentLink.expires_at > now]
    if recipient_email is not None:
        recipient_email = normalize_email(recipient_email)
        sent = await session.scalar(
            select(func.count())
            .select_from(PaymentLink)
            .where(PaymentLink.invoice_id == invoice.id, PaymentLink.recipient_email == recipient_email)
        )
        if not sent:
            raise LinkError(f"invoice {invoice.number} was never sent to {recipient_email}")
        live.append(PaymentLink.recipient_email == recipient_email)
    result = await session.execute(update(PaymentLink).where(*live).values(revoked_at=now))
    count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    audit.record(session, actor, "link.revoke", f"invoice:{invoice.number}", count=count, to=recipient_email, invoice_status=invoice.status)
    return Revoked(invoice.number, invoice.status, count)


async def release_held_invoices(session: AsyncSession, settings: Settings, customer: Customer) -> int:
    """Queue the invoice email of every payable (open or partly paid) invoice whose newest live link was held, unsent."""
    if send_block_reason(customer) is not None:
        return 0
    now = utcnow()
    invoices = (
        await session.execute(select(Invoice).where(Invoice.customer_id == customer.id, Invoice.status.in_(InvoiceStatus.PAYABLE)))
    ).scalars()
    released = 0
    for invoice in invoices:
        link = await newest_live_link(session, invoice.id, now)
        if link is None or link.sent_at is not None:
            continue
        if not _queue_link_email(session, settings, invoice, customer, link, actor="link", kind=Kind.INVOICE):
            continue
        link.sent_at = now
        audit.record(session, "link", "link.released", f"invoice:{invoice.number}", link=str(link.id))
        released += 1
    return released


async def newest_live_link(session: AsyncSession, invoice_id: uuid.UUID, now: datetime) -> PaymentLink | None:
    query = (
        select(PaymentLink)
        .where(
            PaymentLink.invoice_id == invoice_id,
            PaymentLink.revoked_at.is_(None),
            PaymentLink.expires_at > now,
            PaymentLink.recipient_email.is_(None),  # the customer's own link, never a colleague's
        )
        .order_by(PaymentLink.created_at.desc())
        .limit(1)
    )
    return (await session.execute(query)).scalar_one_or_none()

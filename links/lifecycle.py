"""A link's life after it is issued: verified addresses, revoke, void, fresh links, reminders.

(Expiry is in the token; opens are counted in links/opens.py.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import audit
from db import utcnow
from emails import outbox
from emails.messages import Kind, invoice_message, verification_message
from links.models import Customer, Invoice, InvoiceStatus, LinkRequest, PaymentLink, ReminderSent
from links.service import (
    LinkError,
    customer_locale,
    find_invoice,
    invoice_facts,
    issue_link,
    link_with_invoice,
    normalize_email,
    pay_signer,
    pay_url,
    send_block_reason,
)
from links.tokens import Purpose, TokenSigner
from payments.models import Payment
from settings import Settings


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


# --- verified addresses ------------------------------------------------------------------------------

VERIFY_TTL_DAYS = 7


def verify_signer(settings: Settings) -> TokenSigner:
    return TokenSigner([str(k) for k in settings.link_secret_keys], Purpose.VERIFY_EMAIL)


def request_verification(session: AsyncSession, settings: Settings, customer: Customer, *, actor: str) -> str:
    """Email the customer a link that confirms the address. Returns the link (for the CLI)."""
    customer.email_verification_id = uuid.uuid4()
    expires_at = (utcnow() + timedelta(days=VERIFY_TTL_DAYS)).replace(microsecond=0)
    url = f"{settings.base_url}/verify/{verify_signer(settings).sign(customer.email_verification_id, expires_at)}"
    content = verification_message(settings.merchant_name, customer.name, url, expires_at, customer_locale(settings, customer))
    outbox.enqueue(session, settings, customer.email, content)
    audit.record(session, actor, "customer.verification_sent", f"customer:{customer.email}")
    return url


async def find_verification(session: AsyncSession, verification_id: uuid.UUID) -> Customer | None:
    query = select(Customer).where(Customer.email_verification_id == verification_id)
    return (await session.execute(query)).scalar_one_or_none()


async def confirm_verification(session: AsyncSession, settings: Settings, verification_id: uuid.UUID) -> Customer | None:
    """Mark the address verified and send the invoice emails that were held for it. Idempotent."""
    customer = await find_verification(session, verification_id)
    if customer is None or customer.email_verified_at is not None:
        return customer
    customer.email_verified_at = utcnow()
    customer.email_verified_by = "customer, by the emailed confirmation link"
    audit.record(session, "link", "customer.verified", f"customer:{customer.email}")
    await release_held_invoices(session, settings, customer)
    return customer


async def release_held_invoices(session: AsyncSession, settings: Settings, customer: Customer) -> int:
    """Queue the invoice email of every open invoice whose newest live link was held, unsent."""
    if send_block_reason(customer) is not None:
        return 0
    now = utcnow()
    invoices = (
        await session.execute(select(Invoice).where(Invoice.customer_id == customer.id, Invoice.status == InvoiceStatus.OPEN))
    ).scalars()
    released = 0
    for invoice in invoices:
        link = await _newest_live_link(session, invoice.id, now)
        if link is None or link.sent_at is not None:
            continue
        url = pay_url(settings, pay_signer(settings).sign(link.id, link.expires_at))
        content = invoice_message(invoice_facts(settings, invoice, customer), url, link.expires_at, customer_locale(settings, customer))
        outbox.enqueue(session, settings, customer.email, content, invoice_id=invoice.id)
        link.sent_at = now
        audit.record(session, "link", "link.released", f"invoice:{invoice.number}", link=str(link.id))
        released += 1
    return released


async def change_email(session: AsyncSession, settings: Settings, customer: Customer, new_email: str, *, actor: str) -> None:
    """A new address is unverified again: nothing is sent to it until the customer confirms it."""
    normalized = normalize_email(new_email)
    if normalized == customer.email:
        return
    taken = (await session.execute(select(Customer.id).where(Customer.email == normalized))).first()
    if taken is not None:
        raise LinkError(f"another customer already has the email {normalized}")
    audit.record(session, actor, "customer.email_changed", f"customer:{customer.email}", new=normalized)
    customer.email = normalized
    customer.email_verified_at = None
    customer.email_verified_by = None
    customer.email_undeliverable_at = None
    customer.email_undeliverable_reason = None
    request_verification(session, settings, customer, actor=actor)


# --- "email me a new link" ----------------------------------------------------------------------------

FRESH_LINKS_PER_INVOICE_PER_HOUR = 3
FRESH_LINKS_PER_CUSTOMER_PER_DAY = 5


async def request_fresh_link(session: AsyncSession, settings: Settings, link_id: uuid.UUID) -> bool:
    """Send a fresh link to the address on file, within the rate limits. Returns whether one went out.

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
    if link.revoked_at is not None or invoice.status != InvoiceStatus.OPEN or send_block_reason(customer) is not None:
        return False
    per_invoice = await _sent_requests(session, LinkRequest.invoice_id == invoice.id, now - timedelta(hours=1))
    per_customer = await _sent_requests(session, LinkRequest.customer_id == customer.id, now - timedelta(days=1))
    if per_invoice >= FRESH_LINKS_PER_INVOICE_PER_HOUR or per_customer >= FRESH_LINKS_PER_CUSTOMER_PER_DAY:
        audit.record(session, "link", "link.fresh_refused", f"invoice:{invoice.number}", reason="rate limit")
        return False
    await issue_link(session, settings, invoice=invoice, customer=customer, actor="link", kind=Kind.NEW_LINK)
    request.sent = True
    return True


async def _sent_requests(session: AsyncSession, condition: Any, since: datetime) -> int:
    query = select(func.count()).select_from(LinkRequest).where(condition, LinkRequest.sent.is_(True), LinkRequest.requested_at > since)
    return int((await session.execute(query)).scalar_one())


# --- reminders ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReminderSentNote:
    invoice: str
    point: str
    recipient: str


async def send_reminders(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    days_before_due: int,
    days_before_link_expiry: int,
    today: date | None = None,
) -> list[ReminderSentNote]:
    """Remind once per invoice and reminder point: before the due date, and before the last link expires.

    Never for paid or void invoices, never to unverified or undeliverable addresses. The unique
    (invoice, point) key makes a second run send nothing twice, even when two runs overlap."""
    now = utcnow()
    today = today or now.date()
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Invoice.id, Invoice.due_date)
                .join(Customer, Customer.id == Invoice.customer_id)
                .where(
                    Invoice.status == InvoiceStatus.OPEN, Customer.email_verified_at.is_not(None), Customer.email_undeliverable_at.is_(None)
                )
            )
        ).all()
    sent: list[ReminderSentNote] = []
    for invoice_id, due_date in rows:
        points = []
        if due_date is not None and today >= due_date - timedelta(days=days_before_due):
            points.append(f"due-{days_before_due}d")
        async with sessions() as session:
            newest = await _newest_live_link(session, invoice_id, now)
        if newest is not None and newest.sent_at is not None and newest.expires_at - now <= timedelta(days=days_before_link_expiry):
            points.append(f"link-expiry:{newest.id}")
        for point in points:
            note = await _remind_once(sessions, settings, invoice_id, point)
            if note is not None:
                sent.append(note)
    return sent


async def _newest_live_link(session: AsyncSession, invoice_id: uuid.UUID, now: datetime) -> PaymentLink | None:
    query = (
        select(PaymentLink)
        .where(PaymentLink.invoice_id == invoice_id, PaymentLink.revoked_at.is_(None), PaymentLink.expires_at > now)
        .order_by(PaymentLink.created_at.desc())
        .limit(1)
    )
    return (await session.execute(query)).scalar_one_or_none()


async def _remind_once(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, invoice_id: uuid.UUID, point: str
) -> ReminderSentNote | None:
    try:
        return await _claim_and_remind(sessions, settings, invoice_id, point)
    except _Skip:
        return None


async def _claim_and_remind(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, invoice_id: uuid.UUID, point: str
) -> ReminderSentNote | None:
    async with sessions.begin() as session:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        claimed = await session.execute(
            insert(ReminderSent).values(invoice_id=invoice_id, point=point, sent_at=utcnow()).on_conflict_do_nothing()
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            return None
        invoice = await session.get_one(Invoice, invoice_id)
        customer = await session.get_one(Customer, invoice.customer_id)
        if invoice.status != InvoiceStatus.OPEN or send_block_reason(customer) is not None:
            raise _Skip  # roll back the claim: the reminder may still be due later
        await issue_link(session, settings, invoice=invoice, customer=customer, actor="reminder", kind=Kind.REMINDER)
        return ReminderSentNote(invoice.number, point, customer.email)


class _Skip(Exception):
    pass

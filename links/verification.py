"""Verified addresses: an invoice is emailed only to an address its owner confirmed."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import EmailContent, Kind, verification_payload, verify_link_url
from links.customers import customer_locale, normalize_email
from links.errors import LinkError
from links.hooks import queue_customer_email
from links.issuing import release_held_invoices
from links.models import Customer
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings

VERIFY_TTL_DAYS = 7


def request_verification(session: AsyncSession, settings: Settings, customer: Customer, *, actor: str) -> str:
    """Email the customer a link that confirms the address. Returns the link (for the CLI).

    The email is queued as facts (the request's id and expiry); its URL is built when it is sent, so
    the outbox holds no token. Like every email to a customer, it is held while the address is
    paused (undeliverable; see links.hooks.paused_reason): correcting the address clears the pause
    and sends a new one."""
    verification_id = customer.email_verification_id = uuid.uuid4()
    expires_at = (utcnow() + timedelta(days=VERIFY_TTL_DAYS)).replace(microsecond=0)
    subject, payload = verification_payload(
        settings.merchant_name,
        customer.name,
        verification_id=verification_id,
        expires_at=expires_at,
        locale=customer_locale(settings, customer),
    )
    content = EmailContent(Kind.VERIFICATION, subject, "", "")
    if queue_customer_email(session, settings, customer, content, actor=actor, payload=payload):
        audit.record(session, actor, "customer.verification_sent", f"customer:{customer.email}")
    return verify_link_url(settings, verification_id, expires_at)


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

"""Reminders: once per invoice and reminder point, never to an unverified or undeliverable address."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.messages import Kind
from links.issuing import issue_link, newest_live_link, send_block_reason
from links.models import Customer, Invoice, InvoiceStatus, ReminderSent
from plumbing.db import insert_ignore, utcnow
from plumbing.settings import Settings


@dataclass(frozen=True)
class ReminderSentNote:
    invoice: str
    point: str
    recipient: str


async def send_due_reminders(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> list[ReminderSentNote]:
    """Send the reminders that are due now, at the configured points (REMINDER_DAYS_BEFORE_DUE,
    REMINDER_DAYS_BEFORE_EXPIRY). What the worker process runs every REMINDER_INTERVAL_SECONDS."""
    return await send_reminders(
        sessions, settings, days_before_due=settings.reminder_days_before_due, days_before_link_expiry=settings.reminder_days_before_expiry
    )


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
            newest = await newest_live_link(session, invoice_id, now)
        if newest is not None and newest.sent_at is not None and newest.expires_at - now <= timedelta(days=days_before_link_expiry):
            points.append(f"link-expiry:{newest.id}")
        for point in points:
            note = await _remind_once(sessions, settings, invoice_id, point)
            if note is not None:
                sent.append(note)
    return sent


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
        claimed = await session.execute(insert_ignore(session, ReminderSent).values(invoice_id=invoice_id, point=point, sent_at=utcnow()))
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

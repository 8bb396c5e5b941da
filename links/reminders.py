"""Reminders: once per invoice and reminder point, never to an unverified or undeliverable address,
and never as the first contact.

Points: the schedule (REMINDER_SCHEDULE, days relative to the due date, e.g. -3,0,7,14; point names
`due-3d`, `due+0d`, `due+7d`, …) and the link-expiry point (`link-expiry:<link id>`, when the last
link sent will expire within REMINDER_DAYS_BEFORE_EXPIRY days). Each point is claimed with a unique
(invoice, point) row, so it is sent at most once however often `remind` runs. Of the schedule, only
the latest point reached is sent: a worker that was stopped for a week sends one reminder, not three.
An invoice that was never emailed (created without --send) gets the invoice email at its point, not
a reminder about something the customer never received. A reminder after the due date says
"overdue since <due date>" (links.invoices.invoice_facts). An invoice paid in part (issue 13) is
reminded of its balance: the facts carry what was paid and what is still due, and the reminder's
subject and button ask for the balance.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.messages import Kind
from links.issuing import issue_link, newest_live_link, send_block_reason
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink, ReminderSent
from plumbing.db import insert_ignore, utcnow
from plumbing.settings import Settings


@dataclass(frozen=True)
class ReminderSentNote:
    invoice: str
    point: str
    recipient: str
    kind: str = Kind.REMINDER  # Kind.INVOICE: the invoice had never been sent, so it was sent, not reminded


def schedule_point(day: int) -> str:
    """The point name of a schedule day: -3 -> 'due-3d' (the name REMINDER_DAYS_BEFORE_DUE=3 used), 7 -> 'due+7d'."""
    return f"due{day:+d}d"


def schedule_point_due(schedule: Sequence[int], due_date: date, today: date) -> str | None:
    """The latest point of the schedule reached today, or None before the first one."""
    reached = [day for day in schedule if today >= due_date + timedelta(days=day)]
    return schedule_point(max(reached)) if reached else None


async def send_due_reminders(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> list[ReminderSentNote]:
    """Send the reminders that are due now, at the configured points (REMINDER_SCHEDULE,
    REMINDER_DAYS_BEFORE_EXPIRY). What the worker process runs every REMINDER_INTERVAL_SECONDS."""
    return await send_reminders(
        sessions, settings, schedule=settings.reminder_schedule, days_before_link_expiry=settings.reminder_days_before_expiry
    )


async def send_reminders(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    schedule: Sequence[int],
    days_before_link_expiry: int,
    today: date | None = None,
) -> list[ReminderSentNote]:
    """Remind once per invoice and reminder point: at the latest point of `schedule` reached (days
    relative to the due date), and before the last link sent expires.

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
                    Invoice.status.in_(InvoiceStatus.PAYABLE),
                    Customer.email_verified_at.is_not(None),
                    Customer.email_undeliverable_at.is_(None),
                )
                .order_by(Invoice.created_at, Invoice.number)
            )
        ).all()
    sent: list[ReminderSentNote] = []
    for invoice_id, due_date in rows:
        point = schedule_point_due(schedule, due_date, today) if due_date is not None else None
        if point is not None:
            note = await _remind_once(sessions, settings, invoice_id, point)
            if note is not None:
                sent.append(note)
                continue  # it carries a fresh link: the older link's expiry no longer matters
        async with sessions() as session:
            newest = await newest_live_link(session, invoice_id, now)
        if newest is not None and newest.sent_at is not None and newest.expires_at - now <= timedelta(days=days_before_link_expiry):
            note = await _remind_once(sessions, settings, invoice_id, f"link-expiry:{newest.id}")
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
        if invoice.status not in InvoiceStatus.PAYABLE or send_block_reason(customer) is not None:
            raise _Skip  # roll back the claim: the reminder may still be due later
        sent_links = select(PaymentLink.id).where(PaymentLink.invoice_id == invoice.id, PaymentLink.sent_at.is_not(None)).limit(1)
        ever_sent = (await session.execute(sent_links)).first() is not None
        kind = Kind.REMINDER if ever_sent else Kind.INVOICE  # never the first contact
        await issue_link(session, settings, invoice=invoice, customer=customer, actor="reminder", kind=kind)
        return ReminderSentNote(invoice.number, point, customer.email, kind)


class _Skip(Exception):
    pass

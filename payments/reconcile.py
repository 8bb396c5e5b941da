"""`python -m links reconcile`: ask Stripe for the truth and apply it through the same state machine.

Safe to run any time, any number of times: every step is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.models import Invoice, InvoiceStatus
from payments.checkout import settle_payment
from payments.events import record_and_apply
from payments.gateway import StripeGateway
from payments.models import Payment, PaymentStatus, WebhookEvent
from plumbing.db import utcnow
from plumbing.settings import Settings

# Events of the last few days are fetched on every run (duplicates are skipped by id), so an event
# that never reached us is found even when newer ones did; the first run looks back 30 days, as
# long as Stripe keeps events.
EVENT_LOOKBACK = timedelta(days=3)
FIRST_RUN_LOOKBACK = timedelta(days=30)


@dataclass
class ReconcileReport:
    checked: int = 0
    events_applied: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)


async def reconcile(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings) -> ReconcileReport:
    report = ReconcileReport()
    before = await _unsettled_invoices(sessions)
    await _missed_events(sessions, gateway, settings, report)
    await _unfinished_payments(sessions, gateway, settings, report)
    after = await _statuses(sessions, list(before))
    for number, status in before.items():
        if after.get(number) != status:
            report.changes.append({"invoice": number, "payment": None, "from": status, "to": after.get(number)})
    return report


async def _unsettled_invoices(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    """Invoices whose money state may still change: open or processing, or with a payment under way."""
    async with sessions() as session:
        live = select(Payment.invoice_id).where(Payment.status.in_(PaymentStatus.LIVE))
        rows = await session.execute(
            select(Invoice.number, Invoice.status).where(or_(Invoice.status.in_(InvoiceStatus.UNSETTLED), Invoice.id.in_(live)))
        )
        return {number: status for number, status in rows}


async def _statuses(sessions: async_sessionmaker[AsyncSession], numbers: list[str]) -> dict[str, str]:
    async with sessions() as session:
        rows = await session.execute(select(Invoice.number, Invoice.status).where(Invoice.number.in_(numbers)))
        return {number: status for number, status in rows}


async def _unfinished_payments(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, report: ReconcileReport
) -> None:
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Payment.id, Payment.status, Invoice.number)
                .join(Invoice, Invoice.id == Payment.invoice_id)
                .where(Payment.status.in_(PaymentStatus.LIVE))
            )
        ).all()
    for payment_id, before, number in rows:
        report.checked += 1
        outcome = await settle_payment(sessions, gateway, settings, payment_id, actor="reconcile")
        if outcome.status != before:
            report.changes.append({"invoice": number, "payment": str(payment_id), "from": before, "to": outcome.status})


async def _missed_events(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, report: ReconcileReport
) -> None:
    async with sessions() as session:
        newest = (await session.execute(select(func.max(WebhookEvent.stripe_created)))).scalar_one_or_none()
    since = int((utcnow() - (EVENT_LOOKBACK if newest else FIRST_RUN_LOOKBACK)).timestamp())
    for event in await gateway.list_events(since):
        async with sessions.begin() as session:
            if await session.run_sync(record_and_apply, settings, event, actor="reconcile"):
                report.events_applied += 1

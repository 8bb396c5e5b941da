"""`python -m links reconcile`: ask Stripe for the truth and apply it through the same state machine.

Safe to run any time, any number of times: every step is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db import utcnow
from links.models import Invoice
from payments.gateway import GatewayError, StripeGateway
from payments.models import Payment, PaymentStatus, WebhookEvent
from payments.service import STALE_CLAIM, _release, apply_intent, apply_stripe_event, record_event
from settings import Settings

# Events are fetched again from a little before the newest one we hold: duplicates are skipped by id.
EVENT_OVERLAP_SECONDS = 300
FIRST_RUN_LOOKBACK = timedelta(days=30)  # Stripe keeps events for 30 days


@dataclass
class ReconcileReport:
    checked: int = 0
    events_applied: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)


async def reconcile(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings) -> ReconcileReport:
    report = ReconcileReport()
    await _missed_events(sessions, gateway, settings, report)
    await _unfinished_payments(sessions, gateway, settings, report)
    return report


async def _unfinished_payments(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, report: ReconcileReport
) -> None:
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Payment.id, Payment.stripe_payment_intent_id, Payment.status, Payment.created_at, Invoice.number)
                .join(Invoice, Invoice.id == Payment.invoice_id)
                .where(Payment.status.in_(PaymentStatus.LIVE))
            )
        ).all()
    for payment_id, intent_id, before, created_at, number in rows:
        report.checked += 1
        if intent_id is None:
            if utcnow() - created_at > STALE_CLAIM:
                async with sessions.begin() as session:
                    payment = await session.get_one(Payment, payment_id)
                    if payment.status == before and payment.stripe_payment_intent_id is None:
                        _release(payment, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
                report.changes.append({"invoice": number, "payment": str(payment_id), "from": before, "to": PaymentStatus.CANCELED})
            continue
        try:
            snapshot = await gateway.retrieve_payment_intent(intent_id)
        except GatewayError as exc:
            report.changes.append({"invoice": number, "payment": str(payment_id), "from": before, "to": before, "error": str(exc)})
            continue
        async with sessions.begin() as session:
            applied = await apply_intent(session, settings, snapshot, actor="reconcile")
            after = applied.status if applied else before
        if after != before:
            report.changes.append({"invoice": number, "payment": str(payment_id), "from": before, "to": after})


async def _missed_events(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, report: ReconcileReport
) -> None:
    async with sessions() as session:
        newest = (await session.execute(select(func.max(WebhookEvent.stripe_created)))).scalar_one_or_none()
    since = newest - EVENT_OVERLAP_SECONDS if newest else int((utcnow() - FIRST_RUN_LOOKBACK).timestamp())
    for event in await gateway.list_events(since):
        async with sessions.begin() as session:
            if await record_event(session, event):
                await apply_stripe_event(session, settings, event, actor="reconcile")
                report.events_applied += 1

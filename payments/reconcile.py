"""`python -m links reconcile`: ask Stripe for the truth and apply it through the same state machine.

Safe to run any time, any number of times: every step is idempotent. Steps: events Stripe sent
that never reached us; every unfinished payment; then orphan PaymentIntents (`_orphan_intents`).
It also undoes an import that died part-way (links.importer.undo_stale_imports), so that a killed
import does not wait for the next one to be cleaned up.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.importer import undo_stale_imports
from links.models import Invoice, InvoiceStatus
from payments.checkout import settle_payment
from payments.events import record_and_apply
from payments.gateway import GatewayError, IntentSnapshot, StripeGateway
from payments.models import Payment, PaymentStatus, WebhookEvent
from payments.state import apply_intent
from plumbing import audit
from plumbing.db import chunked, utcnow
from plumbing.settings import Settings

log = logging.getLogger("paylink.payments")

# Events of the last few days are fetched on every run (duplicates are skipped by id), so an event
# that never reached us is found even when newer ones did; the first run looks back 30 days, as
# long as Stripe keeps events.
EVENT_LOOKBACK = timedelta(days=3)
FIRST_RUN_LOOKBACK = timedelta(days=30)
# Attempts that ended without a PaymentIntent id of ours this recently are checked for orphans at
# Stripe (intents created for them that nobody will ever confirm).
ORPHAN_LOOKBACK = timedelta(days=7)
# Stripe states of an intent that was never confirmed, or is waiting for the customer: cancelable.
NEVER_CONFIRMED = ("requires_confirmation", "requires_payment_method", "requires_action")


@dataclass
class ReconcileReport:
    checked: int = 0
    events_applied: int = 0
    orphans_canceled: int = 0
    imports_undone: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)


async def reconcile(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings) -> ReconcileReport:
    report = ReconcileReport()
    before = await _unsettled_invoices(sessions)
    await _missed_events(sessions, gateway, settings, report)
    await _unfinished_payments(sessions, gateway, settings, report)
    await _orphan_intents(sessions, gateway, settings, report)
    report.imports_undone = [str(batch) for batch in await undo_stale_imports(sessions, settings)]
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


async def _orphan_intents(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, report: ReconcileReport
) -> None:
    """Cancel PaymentIntents created at Stripe for one of our attempts that will never confirm them.

    The process may die (or time out) between creating an intent and committing its id: the attempt
    is later released as abandoned, and the intent would wait in requires_confirmation at Stripe
    forever. Stripe (and localstripe) cannot search intents by metadata, so when such attempts exist
    we list the intents created since the oldest of them and cancel every never-confirmed one whose
    metadata names one of our payments that is not live with that intent. An attempt that is still
    live and has no intent id yet may be about to commit and confirm its intent: it is left alone
    (once stale, the step before releases it, and the next pass cancels its intent)."""
    since = utcnow() - ORPHAN_LOOKBACK
    async with sessions() as session:
        oldest = (
            await session.execute(
                select(func.min(Payment.created_at)).where(
                    Payment.stripe_payment_intent_id.is_(None), Payment.live_invoice_id.is_(None), Payment.created_at >= since
                )
            )
        ).scalar_one_or_none()
    if oldest is None:
        return  # the usual case: no attempt ended without its intent id, nothing to ask Stripe
    created_since = int((oldest - timedelta(minutes=5)).timestamp())  # clocks differ a little
    try:
        listed = await gateway.list_payment_intents(created_since)
    except GatewayError as exc:
        log.warning("reconcile.orphans_not_listed error=%s", exc)
        return
    orphans = [intent for _, intent in listed if intent.status in NEVER_CONFIRMED and _uuid(intent.metadata.get("payment_id"))]
    if not orphans:
        return
    ids = list({pid for intent in orphans if (pid := _uuid(intent.metadata.get("payment_id"))) is not None})
    payments: dict[uuid.UUID, tuple[uuid.UUID | None, str | None, str]] = {}
    async with sessions() as session:
        for chunk in chunked(ids):
            rows = await session.execute(
                select(Payment.id, Payment.live_invoice_id, Payment.stripe_payment_intent_id, Invoice.number)
                .join(Invoice, Invoice.id == Payment.invoice_id)
                .where(Payment.id.in_(chunk))
            )
            payments.update({pid: (live, intent_id, number) for pid, live, intent_id, number in rows})
    for intent in orphans:
        payment_id = _uuid(intent.metadata.get("payment_id"))
        if payment_id is None or payment_id not in payments:
            continue  # not ours (another system, or another database on the same account)
        live, recorded, number = payments[payment_id]
        if live is not None and recorded in (None, intent.id):
            continue  # a live attempt's own intent: it may be confirmed any moment
        await _cancel_orphan(sessions, gateway, settings, intent, number, payment_id, report)


async def _cancel_orphan(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    intent: IntentSnapshot,
    number: str,
    payment_id: uuid.UUID,
    report: ReconcileReport,
) -> None:
    try:
        canceled = await gateway.cancel_payment_intent(intent.id)
    except GatewayError as exc:  # confirmed or canceled meanwhile: leave it to the next pass
        log.warning("reconcile.orphan_not_canceled intent=%s error=%s", intent.id, exc)
        return
    async with sessions.begin() as session:
        # Recorded like Stripe's payment_intent.canceled event would be (it links the intent to
        # the attempt that has none, for the audit trail); a released attempt stays as it is.
        await session.run_sync(apply_intent, settings, canceled, actor="reconcile")
        audit.record(session, "reconcile", "payment.orphan_canceled", f"invoice:{number}", payment=str(payment_id), intent=intent.id)
    report.orphans_canceled += 1
    change = {"invoice": number, "payment": str(payment_id), "intent": intent.id, "from": intent.status, "to": canceled.status}
    report.changes.append(change)


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None

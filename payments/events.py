"""Stripe events: the id is stored first (a duplicate does nothing), then one handler per event type."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from payments.cards import apply_card_event, apply_customer_event
from payments.gateway import intent_snapshot
from payments.models import Payment, PaymentProfile, WebhookEvent
from payments.state import PREFETCHED_PAYMENTS, apply_dispute, apply_intent, apply_refund, payments_with_invoice
from plumbing.db import insert_ignore, utcnow
from plumbing.settings import Settings


def _event_row(event: dict[str, Any], now: datetime) -> dict[str, Any]:
    # processed_at is set here: the event is applied in this same transaction, or not at all.
    return {
        "id": event["id"],
        "type": str(event.get("type")),
        "stripe_created": event.get("created"),
        "received_at": now,
        "processed_at": now,
    }


def _insert_events(session: Session) -> Any:
    return insert_ignore(session, WebhookEvent)


def record_event(session: Session, event: dict[str, Any]) -> bool:
    """Store the event id first, with an insert that cannot race. True if it is new."""
    result = session.execute(_insert_events(session).values(**_event_row(event, utcnow())))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_and_apply_batch(session: Session, settings: Settings, events: list[dict[str, Any]]) -> list[bool]:
    """record_and_apply for many events in one transaction, with one statement to store their ids
    and one query for the payments they name. Call it with autoflush off: one flush at the end."""
    now = utcnow()
    inserted = session.execute(_insert_events(session).values([_event_row(e, now) for e in events]).returning(WebhookEvent.id)).scalars()
    new_ids = set(inserted)
    intents = [
        str(e["data"]["object"]["id"]) for e in events if str(e.get("type", "")).startswith("payment_intent.") and e["id"] in new_ids
    ]
    if intents:
        loaded = session.execute(payments_with_invoice(Payment.stripe_payment_intent_id.in_(intents))).scalars().all()
        session.info[PREFETCHED_PAYMENTS] = {p.stripe_payment_intent_id: p for p in loaded}
    results = []
    try:
        for event in events:
            is_new = event["id"] in new_ids
            new_ids.discard(event["id"])  # a second copy in the same batch is a duplicate
            if is_new:
                apply_stripe_event(session, settings, event)
            results.append(is_new)
    finally:
        session.info.pop(PREFETCHED_PAYMENTS, None)
    return results


def record_and_apply(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> bool:
    """Store the event id; apply the event only if it is new. Returns whether it was new."""
    is_new = record_event(session, event)
    if is_new:
        apply_stripe_event(session, settings, event, actor=actor)
    return is_new


Handler = Callable[[Session, Settings, dict[str, Any], str], None]


def _on_intent(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    apply_intent(session, settings, intent_snapshot(obj), actor=actor)


def _on_card_detached(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    session.execute(delete(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == obj.get("id")))


def _on_card(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    apply_card_event(session, obj)


def _on_customer(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    apply_customer_event(session, obj)


# One handler per event type (what dj-stripe and polar do); a type not listed is stored and acknowledged.
HANDLERS: dict[str, Handler] = {
    "payment_intent.succeeded": _on_intent,
    "payment_intent.payment_failed": _on_intent,
    "payment_intent.processing": _on_intent,
    "payment_intent.canceled": _on_intent,
    "payment_intent.requires_action": _on_intent,
    "payment_intent.created": _on_intent,
    "payment_intent.amount_capturable_updated": _on_intent,
    "payment_intent.partially_funded": _on_intent,
    "charge.refunded": apply_refund,
    "charge.dispute.created": apply_dispute,
    "payment_method.attached": _on_card,
    "payment_method.updated": _on_card,
    "payment_method.automatically_updated": _on_card,
    "payment_method.detached": _on_card_detached,
    "customer.updated": _on_customer,
}


def apply_stripe_event(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> None:
    """Apply one verified, newly recorded event through its handler."""
    kind = str(event.get("type"))
    handler = HANDLERS.get(kind) or (_on_intent if kind.startswith("payment_intent.") else None)
    if handler is not None:
        handler(session, settings, (event.get("data") or {}).get("object") or {}, actor)


class EventWriter(Protocol):
    """Records and applies verified events; `apply` answers True for a new event, False for a duplicate."""

    def start(self) -> None: ...

    async def apply(self, event: dict[str, Any]) -> bool: ...

    async def close(self) -> None: ...


class DirectEventWriter:
    """Each event in its own transaction (PostgreSQL, where writers run side by side)."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._sessions = sessions

    def start(self) -> None:
        pass

    async def apply(self, event: dict[str, Any]) -> bool:
        async with self._sessions.begin() as session:
            return await session.run_sync(record_and_apply, self._settings, event)

    async def close(self) -> None:
        pass

"""Stripe events: the id is stored first (a duplicate does nothing), then one handler per event type."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from emails import outbox
from links.models import Invoice
from payments.cards import apply_card_event, apply_customer_event
from payments.documents import defer_receipt_numbers, number_deferred_receipts, stop_deferring_receipt_numbers
from payments.gateway import intent_snapshot
from payments.models import Payment, PaymentProfile, WebhookEvent
from payments.state import (
    PREFETCHED_LINKS,
    PREFETCHED_PAYMENTS,
    apply_dispute,
    apply_intent,
    apply_refund,
    newest_links,
    payments_with_invoice,
)
from plumbing import audit
from plumbing.db import insert_ignore, utcnow
from plumbing.settings import Settings

log = logging.getLogger("paylink.webhooks")


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


class EventRefused(Exception):
    """A verified event that can never be applied (no data, a non-numeric amount, ...). It is stored
    (so a redelivery is a duplicate), finance is told, and Stripe is answered 400 instead of being
    asked, with a 500, to deliver it again for three days."""


Applied = bool | EventRefused  # True: new and applied; False: a duplicate; EventRefused: stored, refused


def _number(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def _optional_number(value: Any) -> bool:
    return value is None or _number(value)


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255


def _optional_text(value: Any) -> bool:
    return value is None or _text(value) or (isinstance(value, dict) and _text(value.get("id")))


# `webhook_events.stripe_created` is a 32-bit INTEGER on PostgreSQL: Stripe's seconds fit until 2038.
MAX_CREATED = 2**31 - 1


def _stored_text(value: Any, longest: int) -> bool:
    # Stripe's ids and types are short printable ASCII; anything else (a NUL, a lone surrogate) the
    # database drivers refuse to store.
    return isinstance(value, str) and 0 < len(value) <= longest and value.isascii() and value.isprintable()


def _envelope_refusal(event: dict[str, Any]) -> EventRefused | None:
    """Why the event's id, type or created cannot be stored as they are (None: they can). Such an
    event is refused with nothing written: storing it would fail the whole transaction, and a 5xx
    has Stripe deliver it again for three days."""
    created = event.get("created")
    if not _stored_text(event.get("id"), 255):
        refused = EventRefused("the event's id is not a short text")
    elif not _stored_text(event.get("type"), 100):
        refused = EventRefused("the event's type is not a short text")
    elif created is not None and not (isinstance(created, int) and not isinstance(created, bool) and 0 <= created <= MAX_CREATED):
        refused = EventRefused("the event's created is not a timestamp")
    else:
        return None
    log.warning("webhook.refused event=%.100r reason=%s (not stored)", event.get("id"), refused)
    return refused


# What each handled type needs of `data.object` before any handler may read it.
_REQUIRED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "payment_intent.": lambda o: _text(o.get("id")) and _number(o.get("amount")) and _text(o.get("currency")) and _text(o.get("status")),
    "charge.refunded": lambda o: (
        _optional_text(o.get("payment_intent")) and (o.get("amount_refunded") is None or _number(o["amount_refunded"]))
    ),
    "charge.dispute.created": lambda o: _optional_text(o.get("payment_intent")) and (o.get("amount") is None or _number(o["amount"])),
    "payment_method.": lambda o: _text(o.get("id")) and _optional_text(o.get("customer")),
    "customer.updated": lambda o: _text(o.get("id")),
}


def check_event(event: dict[str, Any]) -> None:
    """Raise EventRefused unless the event carries what its handler needs (unhandled types pass)."""
    kind = str(event.get("type"))
    rule = next(
        (check for prefix, check in _REQUIRED.items() if kind == prefix or (prefix.endswith(".") and kind.startswith(prefix))), None
    )
    if rule is None:
        return
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise EventRefused("the event has no data.object")
    if not rule(obj):
        raise EventRefused(f"data.object lacks what a {kind} event must carry, or carries it in the wrong type")


def _refuse(session: Session, settings: Settings, event: dict[str, Any], refused: EventRefused, actor: str) -> EventRefused:
    """Keep the refusal with the stored event id: audited, and finance is told once."""
    audit.record(session, actor, "webhook.refused", f"event:{event['id']}", type=str(event.get("type"))[:100], reason=str(refused))
    outbox.alert_finance(
        session,
        settings,
        f"A Stripe event could not be processed: {event['id']}",
        [f"Type: {str(event.get('type'))[:100]}", f"Reason: {refused}", "Look it up in the Stripe dashboard; nothing was changed here."],
    )
    log.warning("webhook.refused event=%s type=%s reason=%s", event["id"], str(event.get("type"))[:100], refused)
    return refused


def _intent_id(event: dict[str, Any]) -> str | None:
    obj = (event.get("data") or {}).get("object") if isinstance(event.get("data"), dict) else None
    return obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None


def record_and_apply_batch(session: Session, settings: Settings, events: list[dict[str, Any]]) -> list[Applied]:
    """record_and_apply for many events in one transaction, with one statement to store their ids
    and one query for the payments they name. Call it with autoflush off: one flush at the end."""
    now = utcnow()
    refusals = [_envelope_refusal(e) for e in events]
    rows = [_event_row(e, now) for e, refused in zip(events, refusals, strict=True) if refused is None]
    new_ids = set(session.execute(_insert_events(session).values(rows).returning(WebhookEvent.id)).scalars()) if rows else set()
    intents = [
        intent_id
        for e, refused in zip(events, refusals, strict=True)
        if refused is None and e["type"].startswith("payment_intent.") and e["id"] in new_ids and (intent_id := _intent_id(e)) is not None
    ]
    if intents:
        # Locked in customer, invoice, payment order: two writers' batches (PostgreSQL) lock in the same order.
        locked = payments_with_invoice(Payment.stripe_payment_intent_id.in_(intents)).order_by(Invoice.customer_id, Invoice.id, Payment.id)
        loaded = session.execute(locked).scalars().all()
        session.info[PREFETCHED_PAYMENTS] = {p.stripe_payment_intent_id: p for p in loaded}
        links: dict[Any, Any] = {p.invoice_id: None for p in loaded}
        if links:
            for invoice_id, link_id, expires_at in session.execute(newest_links(list(links))):
                links[invoice_id] = links[invoice_id] or (link_id, expires_at)
        session.info[PREFETCHED_LINKS] = links
    results: list[Applied] = []
    defer_receipt_numbers(session)
    try:
        for event, refused in zip(events, refusals, strict=True):
            if refused is not None:
                results.append(refused)  # nothing stored
                continue
            is_new = event["id"] in new_ids
            new_ids.discard(event["id"])  # a second copy in the same batch is a duplicate
            results.append(_apply_new(session, settings, event, "webhook") if is_new else False)
        number_deferred_receipts(session)  # the last statement before the flush and the commit
    finally:
        stop_deferring_receipt_numbers(session)
        session.info.pop(PREFETCHED_PAYMENTS, None)
        session.info.pop(PREFETCHED_LINKS, None)
    return results


def _apply_new(session: Session, settings: Settings, event: dict[str, Any], actor: str) -> Applied:
    try:
        check_event(event)
    except EventRefused as refused:
        return _refuse(session, settings, event, refused, actor)
    apply_stripe_event(session, settings, event, actor=actor)
    return True


def record_and_apply_outcome(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> Applied:
    """Store the event id; apply the event only if it is new. True (applied), False (a duplicate),
    or EventRefused (refused: the caller commits, then answers 400; stored unless its id, type or
    created could not be, see `_envelope_refusal`)."""
    refused = _envelope_refusal(event)
    if refused is not None:
        return refused
    if not record_event(session, event):
        return False
    return _apply_new(session, settings, event, actor)


def record_and_apply(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> bool:
    """Store the event id; apply the event only if it is new. Returns whether it was new (a refused
    event is new too: stored, finance told, nothing applied)."""
    return record_and_apply_outcome(session, settings, event, actor=actor) is not False


Handler = Callable[[Session, Settings, dict[str, Any], str], None]


def _on_intent(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    apply_intent(session, settings, intent_snapshot(obj), actor=actor)


def _on_card_detached(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    session.execute(delete(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == obj.get("id")))


def _on_card(session: Session, settings: Settings, obj: dict[str, Any], actor: str) -> None:
    apply_card_event(session, obj)


def _on_customer(session: Session, settings: Settings, event: dict[str, Any], actor: str) -> None:
    created = event.get("created")
    valid = isinstance(created, int) and not isinstance(created, bool) and 0 < created < 2**33
    moment = datetime.fromtimestamp(created, UTC) if valid else None  # type: ignore[arg-type]
    apply_customer_event(session, (event.get("data") or {}).get("object") or {}, moment)


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
}
# Handlers that read the whole event, not only `data.object`: customer.updated compares the event's
# `created` with the default card's last decision (a late delivery must not undo a newer one).
EVENT_HANDLERS: dict[str, Handler] = {
    "customer.updated": _on_customer,
}


def apply_stripe_event(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> None:
    """Apply one verified, newly recorded event through its handler."""
    kind = str(event.get("type"))
    if kind in EVENT_HANDLERS:
        EVENT_HANDLERS[kind](session, settings, event, actor)
        return
    handler = HANDLERS.get(kind) or (_on_intent if kind.startswith("payment_intent.") else None)
    if handler is not None:
        handler(session, settings, (event.get("data") or {}).get("object") or {}, actor)


class EventWriter(Protocol):
    """Records and applies verified events; `apply` answers True for a new event, False for a
    duplicate, and raises EventRefused (after committing the refusal) for one that cannot be applied."""

    def start(self) -> None: ...

    async def apply(self, event: dict[str, Any]) -> bool: ...

    async def close(self) -> None: ...


class DirectEventWriter:
    """Each event in its own transaction (PostgreSQL: a container that was not started, and the
    batch writer's one-by-one retry, payments/pg_batches.py)."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._sessions = sessions

    def start(self) -> None:
        pass

    async def apply(self, event: dict[str, Any]) -> bool:
        async with self._sessions.begin() as session:
            outcome = await session.run_sync(record_and_apply_outcome, self._settings, event)
        if isinstance(outcome, EventRefused):
            raise outcome  # after the commit: the event id and the alert are kept
        return outcome

    async def close(self) -> None:
        pass

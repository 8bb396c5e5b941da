"""Signed events that can never be applied: stored once, finance told, Stripe answered 400 (not 500)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_query, in_thread, signed_event
from tests.integration.helpers import invoice_status, issue_invoice, paid_intent_for


def event(event_id: str, kind: str, data: Any) -> dict[str, Any]:
    return {"id": event_id, "object": "event", "type": kind, "created": int(time.time()), "data": data}


def deliver(server: Any, payload_event: dict[str, Any]) -> httpx.Response:
    payload, header = signed_event(payload_event)
    return httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}, timeout=30)


BROKEN = [
    ("evt_no_data", "payment_intent.succeeded", None),
    ("evt_no_object", "payment_intent.succeeded", {"object": "not an object"}),
    (
        "evt_text_amount",
        "payment_intent.succeeded",
        {"object": {"id": "pi_x", "amount": "twelve", "currency": "eur", "status": "succeeded"}},
    ),
    ("evt_no_currency", "payment_intent.payment_failed", {"object": {"id": "pi_y", "amount": 100, "status": "requires_payment_method"}}),
    ("evt_bad_refund", "charge.refunded", {"object": {"id": "ch_1", "payment_intent": "pi_z", "amount_refunded": {"nested": 1}}}),
    ("evt_bad_card", "payment_method.attached", {"object": {"customer": "cus_1"}}),
]


@pytest.mark.postgres
class TestEventsThatCanNeverBeApplied:
    """A verified event Stripe will keep sending (no data, a non-numeric amount) is refused once, for good."""

    @pytest.mark.parametrize(("event_id", "kind", "data"), BROKEN)
    def test_refused_with_400_stored_and_reported(self, server: Any, settings: Settings, event_id: str, kind: str, data: Any) -> None:
        broken = event(event_id, kind, data)
        first = deliver(server, broken)
        assert first.status_code == 400, first.text
        assert "event refused" in first.text
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = :id", id=event_id) == [(1,)]
        alerts = db_query(settings.database_url, "SELECT subject FROM outbox WHERE kind = 'finance_alert'")
        assert any(event_id in subject for (subject,) in alerts)
        audited = db_query(settings.database_url, "SELECT action FROM audit_log WHERE subject = :s", s=f"event:{event_id}")
        assert audited == [("webhook.refused",)]
        # Stripe delivers it again anyway: now it is a duplicate, answered 200, and finance is not told twice.
        again = deliver(server, broken)
        assert (again.status_code, again.json()["duplicate"]) == (200, True)
        alerts = db_query(settings.database_url, "SELECT subject FROM outbox WHERE kind = 'finance_alert'")
        assert sum(event_id in subject for (subject,) in alerts) == 1

    def test_an_unknown_event_type_is_still_acknowledged(self, server: Any) -> None:
        response = deliver(server, event("evt_unknown_type", "invoice.finalized", None))
        assert (response.status_code, response.json()["duplicate"]) == (200, False)


class TestRefusedAmongGoodOnes:
    """In one batch of the SQLite writer, a broken event is refused alone; its neighbours are applied."""

    def test_batch_with_a_broken_event(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        from payments.events import EventRefused
        from payments.sqlite_batches import SqliteBatchWriter

        issued = issue_invoice(cli, localstripe, CARD_OK)
        good = event("evt_batch_good", "payment_intent.succeeded", {"object": paid_intent_for(localstripe, issued)})
        broken = event("evt_batch_broken", "payment_intent.succeeded", {"object": {"id": "pi_q", "amount": None}})
        writer = SqliteBatchWriter(settings)
        try:
            results = writer.apply_batch([broken, good])
        finally:
            in_thread(asyncio.run, writer.close())
        assert isinstance(results[0], EventRefused) and results[1] is True
        assert invoice_status(cli, issued.number)["status"] == "paid"
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id LIKE 'evt_batch_%'") == [(2,)]

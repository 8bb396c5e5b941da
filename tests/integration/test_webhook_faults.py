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


def one_batch(settings: Settings, *events: dict[str, Any]) -> list[Any]:
    """The events applied as one batch of the SQLite writer (what a burst of deliveries becomes)."""
    from payments.sqlite_batches import SqliteBatchWriter

    writer = SqliteBatchWriter(settings)
    try:
        return writer.apply_batch(list(events))
    finally:
        in_thread(asyncio.run, writer.close())


class TestRefusedAmongGoodOnes:
    """In one batch of the SQLite writer, a broken event is refused alone; its neighbours are applied."""

    def test_batch_with_a_broken_event(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        from payments.events import EventRefused

        issued = issue_invoice(cli, localstripe, CARD_OK)
        good = event("evt_batch_good", "payment_intent.succeeded", {"object": paid_intent_for(localstripe, issued)})
        broken = event("evt_batch_broken", "payment_intent.succeeded", {"object": {"id": "pi_q", "amount": None}})
        results = one_batch(settings, broken, good)
        assert isinstance(results[0], EventRefused) and results[1] is True
        assert invoice_status(cli, issued.number)["status"] == "paid"
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id LIKE 'evt_batch_%'") == [(2,)]


# What an event's envelope may carry that no column can store: each made the transaction fail (500).
BAD_ENVELOPES = [
    ("created_too_large", {"created": 2**70}),
    ("created_past_2038", {"created": 2**31}),
    ("created_an_object", {"created": {"seconds": 1}}),
    ("created_a_text", {"created": "yesterday"}),
    ("created_negative", {"created": -1}),
    ("type_an_object", {"type": {"name": "payment_intent.succeeded"}}),
    ("type_too_long", {"type": "payment_intent." + "x" * 100}),
    ("id_too_long", {"id": "evt_" + "x" * 300}),
    ("id_with_a_nul", {"id": "evt_\x00nul"}),
    ("id_empty", {"id": ""}),
]


@pytest.mark.postgres
class TestEnvelopesThatCannotBeStored:
    """A signed event whose id, type or created cannot be stored is refused with a 400, and nothing
    is written (a 500 would have Stripe deliver it again for three days)."""

    @pytest.mark.parametrize(("case", "envelope"), BAD_ENVELOPES, ids=[case for case, _ in BAD_ENVELOPES])
    def test_refused_with_400_and_nothing_written(self, server: Any, settings: Settings, case: str, envelope: dict[str, Any]) -> None:
        broken = {**event(f"evt_{case}", "invoice.finalized", None), **envelope}
        response = deliver(server, broken)
        assert response.status_code == 400, response.text
        assert "event refused" in response.text
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events") == [(0,)]
        assert db_query(settings.database_url, "SELECT count(*) FROM audit_log WHERE action = 'webhook.refused'") == [(0,)]
        # The writer is not stuck on it: the next event is applied.
        after = deliver(server, event(f"evt_after_{case}", "invoice.finalized", None))
        assert (after.status_code, after.json()["duplicate"]) == (200, False)

    def test_a_missing_created_is_still_stored(self, server: Any, settings: Settings) -> None:
        undated = event("evt_undated", "invoice.finalized", None)
        del undated["created"]
        assert deliver(server, undated).status_code == 200
        assert db_query(settings.database_url, "SELECT stripe_created FROM webhook_events WHERE id = 'evt_undated'") == [(None,)]


class TestUnstorableAmongGoodOnes:
    """In one batch of the SQLite writer, an event that cannot be stored is refused alone, and the
    batch is not rolled back and applied again one by one for it."""

    def test_batch_with_an_unstorable_event(
        self, cli: Any, localstripe: LocalStripe, settings: Settings, caplog: pytest.LogCaptureFixture
    ) -> None:
        from payments.events import EventRefused

        issued = issue_invoice(cli, localstripe, CARD_OK)
        good = event("evt_batch_good", "payment_intent.succeeded", {"object": paid_intent_for(localstripe, issued)})
        unstorable = {**event("evt_batch_huge", "payment_intent.succeeded", None), "created": 2**70}
        results = one_batch(settings, unstorable, good)
        assert isinstance(results[0], EventRefused) and results[1] is True
        assert invoice_status(cli, issued.number)["status"] == "paid"
        assert db_query(settings.database_url, "SELECT id FROM webhook_events WHERE id LIKE 'evt_batch_%'") == [("evt_batch_good",)]
        assert not any("retrying_one_by_one" in r.getMessage() for r in caplog.records)

"""Stripe webhooks: verified before read, recorded once, applied by one state machine."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_query, in_thread, signed_event, wait_until
from tests.integration.helpers import intent_event, invoice_status, issue_invoice, paid_intent_for


class TestSignature:
    """Nothing is read or written for a webhook whose signature does not verify."""

    def test_bad_signature_is_400_and_writes_nothing(self, server, settings: Settings) -> None:
        payload, header = signed_event(
            intent_event("evt_forged", {"id": "pi_x", "status": "succeeded", "amount": 1, "currency": "eur"}), secret="whsec_wrong"
        )
        response = httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header})
        assert response.status_code == 400
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_forged'") == [(0,)]

    def test_missing_and_stale_signatures_are_400(self, server, settings: Settings) -> None:
        event = intent_event("evt_stale", {"id": "pi_x", "status": "succeeded", "amount": 1, "currency": "eur"})
        payload, header = signed_event(event, timestamp=int(time.time()) - 301)
        assert httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}).status_code == 400
        assert httpx.post(f"{server.base}/webhooks/stripe", content=payload).status_code == 400
        assert (
            httpx.post(f"{server.base}/webhooks/stripe", content=b"not json", headers={"stripe-signature": "t=1,v1=00"}).status_code == 400
        )
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_stale'") == [(0,)]

    def test_a_signature_from_the_future_is_refused(self, server, settings: Settings) -> None:
        """Correctly signed, but dated beyond the tolerance ahead: a replay window closes both ways."""
        event = intent_event("evt_future", {"id": "pi_future", "status": "succeeded", "amount": 1, "currency": "eur"})
        # 10 s past the tolerance: int() drops up to a second and the request takes some, so + 301 was
        # sometimes within it by the time the server looked (failed once on a loaded machine).
        payload, header = signed_event(event, timestamp=int(time.time()) + 310)
        response = httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header})
        assert response.status_code == 400
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_future'") == [(0,)]
        near = intent_event(
            "evt_near_future", {"id": "pi_nf", "status": "succeeded", "amount": 1, "currency": "eur"}
        )  # a clock a little ahead is fine
        payload, header = signed_event(near, timestamp=int(time.time()) + 30)
        assert httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}).status_code == 200


@pytest.mark.postgres
class TestExactlyOnce:
    """A replayed event is acknowledged and does nothing more."""

    def test_replayed_event_is_processed_once(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)  # the invoice email
        event = intent_event("evt_replayed_1", paid_intent_for(localstripe, issued))
        payload, header = signed_event(event)
        responses = [httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}) for _ in range(5)]
        assert [r.status_code for r in responses] == [200] * 5
        assert [r.json()["duplicate"] for r in responses] == [False, True, True, True, True]

        shown = invoice_status(cli, issued.number)
        assert shown["status"] == "paid"
        assert shown["amount_paid"] == 12050
        wait_until(lambda: len(smtp.mailbox.to(issued.email)) >= 2, what="the receipt")
        time.sleep(0.5)
        receipts = [m for m in smtp.mailbox.to(issued.email) if m["Subject"].startswith("Receipt")]
        assert len(receipts) == 1
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_replayed_1'") == [(1,)]

    def test_concurrent_duplicates_apply_once(self, cli, localstripe: LocalStripe, server, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        payload, header = signed_event(intent_event("evt_concurrent_1", paid_intent_for(localstripe, issued)))

        async def deliver_twice() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                post = lambda: client.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header})  # noqa: E731
                return list(await asyncio.gather(post(), post()))

        responses = asyncio.run(deliver_twice())
        assert sorted(r.json()["duplicate"] for r in responses) == [False, True]
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050
        receipts = db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'receipt'")
        assert receipts == [(1,)]

    def test_unknown_event_types_are_stored_and_acknowledged(self, server, settings: Settings) -> None:
        payload, header = signed_event(
            {"id": "evt_unknown", "type": "balance.available", "created": int(time.time()), "data": {"object": {}}}
        )
        response = httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header})
        assert response.status_code == 200
        assert db_query(settings.database_url, "SELECT type FROM webhook_events WHERE id = 'evt_unknown'") == [("balance.available",)]


class TestOversizedBodies:
    """A huge body, declared or streamed in chunks, is refused before it is read into memory."""

    def test_declared_and_chunked_oversized_bodies_are_413(self, server) -> None:
        big = b"x" * (600 * 1024)
        declared = httpx.post(f"{server.base}/webhooks/stripe", content=big, headers={"stripe-signature": "t=1,v1=0"})
        assert declared.status_code == 413

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"y" * (100 * 1024)

        streamed = httpx.post(f"{server.base}/webhooks/stripe", content=chunks(), headers={"stripe-signature": "t=1,v1=0"})
        assert streamed.status_code == 413


@pytest.mark.postgres
class TestBadEventInABatch:
    """An event that fails when applied is refused alone (500, so Stripe retries it); one that can never be
    applied (a non-numeric amount) is stored and refused for good (400); the others apply."""

    def test_one_bad_event_among_good_ones(self, cli, localstripe: LocalStripe, server, settings: Settings) -> None:
        issued = [issue_invoice(cli, localstripe, CARD_OK) for _ in range(7)]
        events = []
        for index, one in enumerate(issued[:6]):
            events.append(intent_event(f"evt_batch_good_{index}", paid_intent_for(localstripe, one)))
        failing = paid_intent_for(localstripe, issued[6])
        # An error code the database cannot store: the failure comes when the changes are written.
        failing.update(status="requires_payment_method", last_payment_error={"code": {"not": "text"}, "message": "declined"})
        broken = intent_event("evt_batch_bad", failing, kind="payment_intent.payment_failed")
        never = intent_event("evt_batch_never", {"id": "pi_never", "status": "succeeded", "amount": "not a number", "currency": "eur",
                                                 "metadata": {"invoice_id": issued[0].invoice_id}})  # fmt: skip
        signed = [signed_event(e) for e in [*events[:3], broken, never, *events[3:]]]

        async def deliver_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(
                    await asyncio.gather(
                        *(client.post(f"{server.base}/webhooks/stripe", content=p, headers={"stripe-signature": h}) for p, h in signed)
                    )
                )

        statuses = [r.status_code for r in asyncio.run(deliver_all())]
        assert statuses == [200, 200, 200, 500, 400, 200, 200, 200]
        assert [invoice_status(cli, one.number)["status"] for one in issued[:6]] == ["paid"] * 6
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_batch_bad'") == [(0,)]
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_batch_never'") == [(1,)]


class TestBatchApplication:
    """The writer's batch path: the same event twice in one batch is applied once."""

    def test_duplicate_within_one_batch(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        from sqlalchemy.orm import Session

        from payments.events import record_and_apply_batch
        from plumbing.db import create_sync_sqlite_engine

        issued = issue_invoice(cli, localstripe, CARD_OK)
        event = intent_event("evt_twice_in_batch", paid_intent_for(localstripe, issued))
        other = intent_event("evt_unrelated", {"id": "pi_not_ours", "status": "succeeded", "amount": 5, "currency": "eur"})
        engine = create_sync_sqlite_engine(settings.database_url)
        try:
            with Session(engine) as session, session.begin(), session.no_autoflush:
                results = record_and_apply_batch(session, settings, [event, other, event])
        finally:
            engine.dispose()
        assert results == [True, True, False]
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"]) == ("paid", 12050)
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'receipt'") == [(1,)]

    def test_an_event_failing_at_its_write_is_refused_alone(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        from payments.sqlite_batches import SqliteBatchWriter

        issued = [issue_invoice(cli, localstripe, CARD_OK) for _ in range(2)]
        good = []
        for index, one in enumerate(issued):
            good.append(intent_event(f"evt_write_good_{index}", paid_intent_for(localstripe, one)))
        third = issue_invoice(cli, localstripe, CARD_OK)
        failing = paid_intent_for(localstripe, third)
        # An error code the database cannot store: the failure comes when the changes are written.
        failing.update(status="requires_payment_method", last_payment_error={"code": {"not": "text"}, "message": "declined"})
        bad = intent_event("evt_write_bad", failing, kind="payment_intent.payment_failed")
        writer = SqliteBatchWriter(settings)
        try:
            results = writer.apply_batch([good[0], bad, good[1]])
        finally:
            in_thread(asyncio.run, writer.close())
        assert results[0] is True and isinstance(results[1], Exception) and results[2] is True
        assert [invoice_status(cli, one.number)["status"] for one in issued] == ["paid", "paid"]
        assert db_query(settings.database_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_write_bad'") == [(0,)]

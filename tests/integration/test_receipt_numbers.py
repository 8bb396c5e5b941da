"""Receipt numbers stay gap-free and unique when webhooks are applied in batches (issue 15).

A batch numbers its receipts at its end with one UPDATE of the sequence (payments/documents.py):
every succeeded payment that counts gets a number, the receipt email queued earlier in the batch
carries the same number, a rolled-back batch gives its numbers back, and on PostgreSQL two workers'
batches applied at the same moment never take the same number or leave a hole.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from plumbing.db import is_sqlite
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_query, in_thread
from tests.integration.helpers import intent_event, invoice_status, issue_invoice, paid_intent_for

Event = dict[str, Any]


def _apply_batches(settings: Settings, batches: list[list[Event]]) -> list[list[Any]]:
    """Apply each batch with the app's writer for the database: SQLite's one after the other (one
    writer), PostgreSQL's at the same moment, each on an engine of its own (two web workers)."""
    if is_sqlite(settings.database_url):
        from payments.sqlite_batches import SqliteBatchWriter

        writer = SqliteBatchWriter(settings)
        try:
            return [writer.apply_batch(batch) for batch in batches]
        finally:
            in_thread(asyncio.run, writer.close())

    async def together() -> list[list[Any]]:
        from payments.pg_batches import PgBatchWriter
        from plumbing.db import create_engine, create_session_factory

        engines = [create_engine(settings.database_url) for _ in batches]
        try:
            writers = [PgBatchWriter(settings, create_session_factory(engine)) for engine in engines]
            return list(await asyncio.gather(*(w.apply_batch(b) for w, b in zip(writers, batches, strict=True))))
        finally:
            for engine in engines:
                await engine.dispose()

    return in_thread(asyncio.run, together())  # type: ignore[no-any-return]


def _numbers_and_payloads(settings: Settings) -> list[tuple[str, str | None]]:
    rows = db_query(
        settings.database_url,
        "SELECT p.receipt_number, o.payload FROM payments p JOIN outbox o ON o.invoice_id = p.invoice_id AND o.kind = 'receipt'"
        " WHERE p.receipt_number IS NOT NULL",
    )
    return [(number, (json.loads(payload) if isinstance(payload, str) else payload)["receipt_number"]) for number, payload in rows]


def _assert_gap_free(settings: Settings, count: int) -> None:
    numbers = sorted(
        int(n[4:]) for (n,) in db_query(settings.database_url, "SELECT receipt_number FROM payments WHERE receipt_number IS NOT NULL")
    )
    assert numbers == list(range(1, count + 1))
    assert db_query(settings.database_url, "SELECT last_value FROM number_sequences WHERE name = 'receipt'") == [(count,)]


def _paid_events(cli: Any, localstripe: LocalStripe, prefix: str, count: int) -> tuple[list[Any], list[Event]]:
    issued = [issue_invoice(cli, localstripe, CARD_OK) for _ in range(count)]
    return issued, [intent_event(f"evt_{prefix}_{index}", paid_intent_for(localstripe, one)) for index, one in enumerate(issued)]


@pytest.mark.postgres
class TestReceiptNumbersInBatches:
    def test_a_batch_numbers_every_receipt_once_in_order(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        issued, events = _paid_events(cli, localstripe, "numbered", 4)
        (results,) = _apply_batches(settings, [[events[0], events[1], events[0], events[2], events[3]]])
        assert results == [True, True, False, True, True]
        assert [invoice_status(cli, one.number)["status"] for one in issued] == ["paid"] * 4
        _assert_gap_free(settings, 4)
        pairs = _numbers_and_payloads(settings)
        assert len(pairs) == 4 and all(number == emailed for number, emailed in pairs)  # the receipt email shows the same number
        numbers = {one.number: invoice_status(cli, one.number).get("receipt_number") for one in issued}
        assert all(value is None or value.startswith("RCT-") for value in numbers.values())

    def test_a_failed_batch_gives_its_numbers_back(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        issued, events = _paid_events(cli, localstripe, "rolled_back", 3)
        failing = paid_intent_for(localstripe, issue_invoice(cli, localstripe, CARD_OK))
        # An error code the database cannot store: the batch fails at its flush, after numbering.
        failing.update(status="requires_payment_method", last_payment_error={"code": {"not": "text"}, "message": "declined"})
        bad = intent_event("evt_rolled_back_bad", failing, kind="payment_intent.payment_failed")
        (results,) = _apply_batches(settings, [[events[0], bad, events[1], events[2]]])
        assert results[0] is True and isinstance(results[1], Exception) and results[2:] == [True, True]
        assert [invoice_status(cli, one.number)["status"] for one in issued] == ["paid"] * 3
        _assert_gap_free(settings, 3)  # the numbers the failed batch took were given back
        assert all(number == emailed for number, emailed in _numbers_and_payloads(settings))

    def test_batches_of_two_workers_at_once_share_one_gap_free_sequence(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        issued, events = _paid_events(cli, localstripe, "two_workers", 8)
        # The same event in both workers' batches too: applied once, a duplicate for the other.
        first, second = [*events[:4], events[5]], [*events[4:], events[0]]
        results = _apply_batches(settings, [first, second])
        applied = [result for batch in results for result in batch]
        assert applied.count(True) == 8 and applied.count(False) == 2, applied
        assert [invoice_status(cli, one.number)["status"] for one in issued] == ["paid"] * 8
        _assert_gap_free(settings, 8)
        pairs = _numbers_and_payloads(settings)
        assert len(pairs) == 8 and all(number == emailed for number, emailed in pairs)

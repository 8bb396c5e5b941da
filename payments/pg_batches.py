"""The PostgreSQL batch writer: verified Stripe events applied exactly once, many per transaction.

One transaction per event costs a dozen round trips and, worse, holds the row lock of the gap-free
receipt number (`number_sequences`, payments/documents.py) from the number to the COMMIT: every
succeeded payment of every worker queues behind it, one commit at a time. So each web worker queues
its verified events to one task that applies them in batches, as SQLite does (payments/sqlite_batches.py):
one transaction per batch, one statement to store the event ids, one locked read of the payments,
their invoices and customers (in customer, invoice, payment order, so two workers' batches take their
locks in the same order), one flush at the commit. The batch takes all its receipt numbers with one
UPDATE of the sequence row as its last statement before the flush and the commit (payments/documents.py),
so the row is locked once per batch and only while it commits, and the numbers stay gap-free and
unique for the same reason as before: they are taken under the row lock in the transaction that marks
the payments succeeded, so a rolled-back batch gives all of them back.

A batch that fails (a bad event, a deadlock with a pay POST or another worker, a lost connection) is
rolled back as a whole and its events are applied again one by one, each in its own transaction, so
that only the failing event is answered 5xx (Stripe delivers it again). A request is answered only
after its event's transaction has committed. Workers still run side by side: batches of different
workers apply in parallel up to the receipt-number row.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from payments.batch_queue import BatchQueue, Pending, WriterStopped, deliver, stopped
from payments.events import Applied, DirectEventWriter, EventRefused, record_and_apply_batch
from plumbing.settings import Settings

log = logging.getLogger("paylink.webhooks")
IN_FLIGHT = 1  # batches of one worker applied at once (2 measured slower: smaller batches, meeting at the receipt row)


class PgBatchWriter:
    """One task per web worker: events queue up and are applied in batches on one connection."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._direct = DirectEventWriter(settings, sessions)
        self._queue = BatchQueue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-writer")

    async def apply(self, event: dict[str, Any]) -> bool:
        """Record and apply one verified event; True if it was new, False for a duplicate."""
        if self._task is None and not self._closed:
            return await self._direct.apply(event)  # not started (a CLI or a test container): one transaction each
        if self._task is None or self._task.done():
            raise WriterStopped()
        return await self._queue.submit(event)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._queue.stop()

    async def _run(self) -> None:
        # Up to IN_FLIGHT batches at once: while one waits for the database, the next is gathered and
        # sent, so the worker's CPU is not idle during round trips (they lock different payments and
        # meet only at the receipt-number row, for their commits).
        slots = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                batch = await self._queue.next_batch()
                task = asyncio.create_task(self._finish(batch, slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _finish(self, batch: list[Pending], slots: asyncio.Semaphore) -> None:
        try:
            results = await self.apply_batch([event for event, _ in batch])
        except asyncio.CancelledError:
            stopped(batch)
            raise
        except Exception as exc:  # never leave a request waiting, whatever happened
            log.exception("webhooks.batch_failed events=%d", len(batch))
            results = [exc] * len(batch)
        finally:
            slots.release()
        deliver(batch, results)

    async def apply_batch(self, events: list[dict[str, Any]]) -> list[Applied | Exception]:
        """All events in one transaction with one flush at the commit; if anything in it fails
        (the commit included), everything is rolled back and the events are applied again one by
        one, each in its own transaction, so that only the failing event is refused."""
        try:
            async with self._sessions.begin() as session:
                return await session.run_sync(_apply_together, self._settings, events)
        except Exception:
            if len(events) > 1:
                log.warning("webhooks.batch_failed_retrying_one_by_one events=%d", len(events), exc_info=True)
        return [await self._apply_alone(event) for event in events]

    async def _apply_alone(self, event: dict[str, Any]) -> Applied | Exception:
        try:
            return await self._direct.apply(event)
        except EventRefused as refused:
            return refused  # stored and committed: answered 400
        except Exception as exc:
            log.exception("webhook.failed event=%s type=%s", event.get("id"), event.get("type"))
            return exc


def _apply_together(session: Session, settings: Settings, events: list[dict[str, Any]]) -> list[Applied | Exception]:
    with session.no_autoflush:  # one flush for the whole batch, at the commit
        return list(record_and_apply_batch(session, settings, events))

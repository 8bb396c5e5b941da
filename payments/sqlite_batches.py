"""The SQLite batch writer: verified Stripe events applied exactly once, fast enough for a payday.

On SQLite every write takes the database's single write lock, and each statement through the async
driver costs a thread hop. So events are queued to one writer that applies them in batches: one
transaction per batch, flushed once, on a synchronous connection in a thread of its own. If any
event of a batch fails, the batch is rolled back and applied again with a savepoint per event, so
that only the failing event is refused (answered 500, so that Stripe delivers it again). A request
is answered only after its batch has committed. On PostgreSQL each web worker batches the same way
(payments/pg_batches.py), and the workers' batches run side by side.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from payments.batch_queue import BatchQueue, WriterStopped, deliver, stopped
from payments.events import Applied, record_and_apply_batch, record_and_apply_outcome
from plumbing.db import create_sync_sqlite_engine
from plumbing.settings import Settings

log = logging.getLogger("paylink.webhooks")


class SqliteBatchWriter:
    """One writer thread for a SQLite database: events queue up and are applied in batches."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engine: Engine = create_sync_sqlite_engine(settings.database_url)
        self._queue = BatchQueue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-writer")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-writer")

    async def apply(self, event: dict[str, Any]) -> bool:
        """Record and apply one verified event; True if it was new, False for a duplicate."""
        if self._task is None or self._task.done():
            raise WriterStopped()
        return await self._queue.submit(event)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._queue.stop()
        await asyncio.to_thread(self._executor.shutdown, True)  # waits for a batch in flight, off the event loop
        self._engine.dispose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._queue.next_batch()
            try:
                results = await loop.run_in_executor(self._executor, self.apply_batch, [event for event, _ in batch])
            except asyncio.CancelledError:
                stopped(batch)
                raise
            except Exception as exc:  # the batch's commit failed: none of its events is applied
                log.exception("webhooks.batch_failed events=%d", len(batch))
                results = [exc] * len(batch)
            deliver(batch, results)

    def apply_batch(self, events: list[dict[str, Any]]) -> list[Applied | Exception]:
        """All events in one transaction with one flush at the commit; if anything in it fails,
        everything is rolled back and the events are applied again one by one, so that only the
        failing event is refused."""
        try:
            return self._apply_together(events)
        except OperationalError:
            # The database itself is unavailable (locked past the busy timeout, disk full): trying
            # each event again would only wait again. Refuse the batch; Stripe delivers it later.
            raise
        except Exception:
            log.warning("webhooks.batch_failed_retrying_one_by_one events=%d", len(events))
            return self._apply_one_by_one(events)

    def _apply_together(self, events: list[dict[str, Any]]) -> list[Applied | Exception]:
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            with session.no_autoflush:  # one flush for the whole batch, at the commit
                return list(record_and_apply_batch(session, self._settings, events))

    def _apply_one_by_one(self, events: list[dict[str, Any]]) -> list[Applied | Exception]:
        results: list[Applied | Exception] = []
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            session.connection()  # take the write lock once, before the first event
            for event in events:
                try:
                    with session.begin_nested():  # its changes are written when it is released
                        outcome = record_and_apply_outcome(session, self._settings, event)
                except Exception as exc:
                    log.exception("webhook.failed event=%s type=%s", event.get("id"), event.get("type"))
                    results.append(exc)
                else:
                    results.append(outcome)
        return results

"""The queue in front of a webhook batch writer (payments/sqlite_batches.py, payments/pg_batches.py):
each request waits on a future for its event's result; the writer takes batches off the queue and
hands every request its result, or WriterStopped when the app shuts down first."""

from __future__ import annotations

import asyncio
from typing import Any

MAX_BATCH = 200
MAX_QUEUED = 10_000  # beyond this, answer 500 at once: Stripe delivers again later

Pending = tuple[dict[str, Any], "asyncio.Future[bool]"]


class WriterStopped(Exception):
    """The app is shutting down; the event was not applied (Stripe delivers it again)."""


class BatchQueue:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=MAX_QUEUED)

    async def submit(self, event: dict[str, Any]) -> bool:
        """Queue one event and wait for its result (True if it was new, False for a duplicate)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((event, future))
        except asyncio.QueueFull:
            raise WriterStopped() from None
        return await future

    async def next_batch(self) -> list[Pending]:
        """Wait for one event, then take whatever else is queued, up to MAX_BATCH."""
        batch = [await self._queue.get()]
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def stop(self) -> None:
        """Answer every event still queued with WriterStopped."""
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(WriterStopped())


def stopped(batch: list[Pending]) -> None:
    """The writer was cancelled with this batch in hand: its requests get WriterStopped."""
    for _, future in batch:
        if not future.done():
            future.set_exception(WriterStopped())


def deliver(batch: list[Pending], results: list[Any]) -> None:
    """Hand each request its result (an exception is raised in it). Never leaves a request waiting,
    whatever happened: results that do not match the batch fail every event of it."""
    if len(results) != len(batch):
        results = [RuntimeError("webhook batch results do not match its events")] * len(batch)
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

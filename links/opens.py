"""Record link opens without a write on the GET path: counted in memory, flushed in the background.

Every second the counts go to the database in one transaction: batched UPDATEs of the links'
counters and batched INSERTs into the access log, FLUSH_CHUNK rows per statement, so that the event
loop, which prepares each statement's parameters, never stops serving for long. The access log gets
one row per link and minute of a flush, with how many opens it counts: a page reloaded thousands of
times a second (or a leaked link hammered) writes one row a second per worker, not one per request.
On shutdown the recorder is asked to stop and writes what it still holds; a failed write keeps the
opens for the next try.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import Uuid, bindparam, case, insert, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.models import LinkOpen, PaymentLink
from plumbing.db import Prepared, UTCDateTime, chunked

log = logging.getLogger("paylink.opens")
FLUSH_CHUNK = 200  # rows per statement: the loop pauses ~2 ms per chunk (measured: 5,000 opens at once, ~15 ms)

_COUNTERS = (
    update(PaymentLink)
    .where(PaymentLink.id == bindparam("link", type_=Uuid()))
    .values(
        open_count=PaymentLink.open_count + bindparam("count"),
        first_opened_at=case(
            (PaymentLink.first_opened_at.is_(None), bindparam("first", type_=UTCDateTime())), else_=PaymentLink.first_opened_at
        ),
        last_opened_at=bindparam("last", type_=UTCDateTime()),
    )
)


_OPENS = insert(LinkOpen).values(
    link_id=bindparam("link_id", type_=Uuid()), opened_at=bindparam("opened_at", type_=UTCDateTime()), opens=bindparam("opens")
)


class _Pending:
    """A link's opens since the last flush, counted as they come (a page reloaded 6,000 times a second
    must not leave 6,000 times to go through at the flush: that held the event loop ~8 ms): how many,
    the first and the last, and per minute the first and how many (the access log's rows)."""

    __slots__ = ("count", "first", "last", "minutes")

    def __init__(self) -> None:
        self.count = 0
        self.first = math.inf  # seconds since the epoch (time.time())
        self.last = -math.inf
        self.minutes: dict[int, list[float]] = {}  # minute since the epoch -> [first open's time, opens]

    def add(self, at: float) -> None:
        self.count += 1
        self.first = min(self.first, at)
        self.last = max(self.last, at)
        minute = self.minutes.get(key := int(at // 60))
        if minute is None:
            self.minutes[key] = [at, 1]
        else:
            minute[0] = min(minute[0], at)
            minute[1] += 1

    def merge(self, other: _Pending) -> None:
        """Take `other`'s opens too (a failed flush's, put back)."""
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        for key, (at, opens) in other.minutes.items():
            minute = self.minutes.setdefault(key, [at, 0])
            minute[0] = min(minute[0], at)
            minute[1] += opens

    def counters(self, link_id: uuid.UUID) -> dict[str, object]:
        return {"link": link_id, "count": self.count, "first": _moment(self.first), "last": _moment(self.last)}

    def log_rows(self, link_id: uuid.UUID) -> list[dict[str, object]]:
        """The access log's rows: one per minute the opens fall in (the usage report counts them by hour
        and day), dated by the first open of that minute."""
        return [{"link_id": link_id, "opened_at": _moment(at), "opens": int(opens)} for at, opens in self.minutes.values()]


def _moment(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


class OpenRecorder:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], interval_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self._interval = interval_seconds
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._stopping = asyncio.Event()
        self._statements: tuple[Prepared, Prepared] | None = None

    def record(self, link_id: uuid.UUID) -> None:
        pending = self._pending.get(link_id)
        if pending is None:
            pending = self._pending[link_id] = _Pending()
        pending.add(time.time())

    async def flush(self) -> int:
        """Write the counted opens in one transaction. Returns how many links were updated."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        # In the links' order: every worker locks the rows it updates in the same order, so two workers
        # flushing the same links at once wait for each other instead of deadlocking.
        counters = [entry.counters(link_id) for link_id, entry in sorted(pending.items())]
        rows = [row for link_id, entry in pending.items() for row in entry.log_rows(link_id)]
        try:
            async with self._sessions.begin() as session:
                connection = await session.connection()
                if self._statements is None:  # compiled for the engine's dialect, on the first flush
                    self._statements = (Prepared(_COUNTERS, connection.dialect), Prepared(_OPENS, connection.dialect))
                counters_sql, opens_sql = self._statements
                # In chunks: the parameters of each statement are prepared on the event loop (with the
                # columns' own bind processors, as SQLAlchemy's execution would, without its per-row
                # bookkeeping), and a second of payday holds thousands of opens; between chunks the
                # loop serves requests.
                for chunk in chunked(counters, FLUSH_CHUNK):
                    await connection.exec_driver_sql(counters_sql.sql, counters_sql.many(chunk))
                for chunk in chunked(rows, FLUSH_CHUNK):
                    await connection.exec_driver_sql(opens_sql.sql, opens_sql.many(chunk))
        except BaseException as exc:
            for link_id, entry in pending.items():  # keep them for the next try
                self._pending.setdefault(link_id, _Pending()).merge(entry)
            if isinstance(exc, Exception):
                log.exception("opens.flush_failed links=%d", len(pending))
                return 0
            raise
        return len(pending)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Flush every interval until `stop()`, then flush what is left."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            await self.flush()
        await self.flush()  # opens counted while the last flush was running

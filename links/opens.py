"""Record link opens without a write on the GET path: counted in memory, flushed in the background."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, insert, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db import utcnow
from links.models import LinkOpen, PaymentLink

log = logging.getLogger("paylink.opens")


@dataclass
class _Pending:
    times: list[datetime]

    @property
    def first(self) -> datetime:
        return min(self.times)

    @property
    def last(self) -> datetime:
        return max(self.times)


class OpenRecorder:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], interval_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self._interval = interval_seconds
        self._pending: dict[uuid.UUID, _Pending] = {}

    def record(self, link_id: uuid.UUID) -> None:
        self._pending.setdefault(link_id, _Pending([])).times.append(utcnow())

    async def flush(self) -> int:
        """Write the counted opens in one transaction. Returns how many links were updated."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            async with self._sessions.begin() as session:
                for link_id, entry in pending.items():
                    await session.execute(
                        update(PaymentLink)
                        .where(PaymentLink.id == link_id)
                        .values(
                            open_count=PaymentLink.open_count + len(entry.times),
                            first_opened_at=case((PaymentLink.first_opened_at.is_(None), entry.first), else_=PaymentLink.first_opened_at),
                            last_opened_at=entry.last,
                        )
                    )
                rows = [{"link_id": link_id, "opened_at": at} for link_id, entry in pending.items() for at in entry.times]
                await session.execute(insert(LinkOpen), rows)
        except Exception:
            log.exception("opens.flush_failed links=%d", len(pending))
            for link_id, entry in pending.items():  # keep them for the next try
                self._pending.setdefault(link_id, _Pending([])).times.extend(entry.times)
            return 0
        return len(pending)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()
        finally:
            await self.flush()

"""Retention: nothing is kept longer than it is useful.

- Outbox bodies (text, html, payload) of sent and dead messages: OUTBOX_KEEP_DAYS (emails.outbox);
- `link_opens` (the usage report's access log): LINK_OPENS_KEEP_DAYS;
- `link_requests` ("email me a new link", kept for the rate limit, which looks back one day):
  LINK_REQUESTS_KEEP_DAYS.

`purge_expired` does all three; the worker process runs it every hour (`purge_forever`). Deletes go
in chunks, each its own short transaction, so a first purge of a large table never holds SQLite's
write lock for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.outbox import purge_old_messages
from links.models import LinkOpen, LinkRequest
from plumbing.db import utcnow
from plumbing.settings import Settings

log = logging.getLogger("paylink.retention")

PURGE_INTERVAL_SECONDS = 3600.0


async def purge_old_activity(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, *, now: datetime | None = None, chunk: int = 5000
) -> dict[str, int]:
    """Delete link opens older than LINK_OPENS_KEEP_DAYS and fresh-link requests older than
    LINK_REQUESTS_KEEP_DAYS. Returns how many rows of each went."""
    now = now or utcnow()
    opens = await _delete_older(sessions, LinkOpen, LinkOpen.opened_at, now - timedelta(days=settings.link_opens_keep_days), chunk)
    requests = await _delete_older(
        sessions, LinkRequest, LinkRequest.requested_at, now - timedelta(days=settings.link_requests_keep_days), chunk
    )
    return {"link_opens": opens, "link_requests": requests}


async def purge_expired(sessions: async_sessionmaker[AsyncSession], settings: Settings, *, now: datetime | None = None) -> dict[str, int]:
    """Everything past its retention: outbox bodies, link opens, fresh-link requests. Returns counts."""
    emptied = await purge_old_messages(sessions, settings, now=now)
    return {"outbox_bodies": emptied, **await purge_old_activity(sessions, settings, now=now)}


async def purge_forever(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, stop: asyncio.Event, *, interval: float = PURGE_INTERVAL_SECONDS
) -> None:
    """What the worker process runs beside the outbox loop: a purge at start, then one every hour,
    until `stop` is set."""
    while not stop.is_set():
        try:
            purged = await purge_expired(sessions, settings)
            if any(purged.values()):
                log.info("retention.purged %s", " ".join(f"{key}={value}" for key, value in purged.items()))
        except Exception:  # must survive a database hiccup; the error is logged
            log.exception("retention.loop_error")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _delete_older(sessions: async_sessionmaker[AsyncSession], table: Any, column: Any, cutoff: datetime, chunk: int) -> int:
    total = 0
    while True:
        async with sessions.begin() as session:
            ids = list((await session.execute(select(table.id).where(column < cutoff).order_by(table.id).limit(chunk))).scalars())
            if ids:
                await session.execute(delete(table).where(table.id.in_(ids)))
        total += len(ids)
        if len(ids) < chunk:
            return total

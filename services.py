"""The container: engines, sessions, the Stripe gateway, the page reader and the writers.

One async context manager, `open_services(settings)`, builds them and closes them again, in reverse
order, whatever fails half-way: the web app's lifespan, the CLI, the outbox worker, the tests and
the benchmarks in load/ all open it, so there is one place where the pieces are wired together.

`background=True` (the web app, and the worker for the mail loop) also starts the work that runs
beside requests: the SQLite webhook batch writer, the link-open recorder and the system usage
sampler (plumbing/usage.py). `readiness()` and `outbox_gauges` answer /health/ready and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from emails import sender
from emails.models import OutboxMessage, OutboxStatus
from emails.outbox import DeadLetterHook
from emails.sender import AttachmentHook
from links import reminders, retention
from links.hooks import apply_dead_message_policy
from links.opens import OpenRecorder
from payments import brakes, documents
from payments.events import EventWriter
from payments.gateway import StripeGateway
from payments.page_reader import PageReader
from payments.pg_batches import PgBatchWriter
from payments.sqlite_batches import SqliteBatchWriter
from plumbing.db import alembic_config, create_engine, create_session_factory, is_sqlite, reader_engine, utcnow
from plumbing.metrics import DatabaseGauges, Reading
from plumbing.settings import Settings
from plumbing.usage import UsageSampler

log = logging.getLogger("paylink.worker")


@dataclass
class Services:
    """Everything a request, a command or a worker needs, built once."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # read-write (BEGIN IMMEDIATE on SQLite)
    readers: async_sessionmaker[AsyncSession]  # read-only transactions
    gateway: StripeGateway
    pages: PageReader  # the pay page's read, on the primary
    opens: OpenRecorder
    events: EventWriter
    # The same read on the replica (DATABASE_READ_URL) if there is one, else `pages`: the pages' GETs use
    # it, except right after this browser changed the link's money state (views/pages.py).
    replica_pages: PageReader
    # Set after a commit that queued email, so that an in-process outbox loop looks at once.
    outbox_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # The outbox's depth, oldest pending age and dead messages, read when /metrics is scraped.
    outbox_gauges: DatabaseGauges = field(init=False)

    def __post_init__(self) -> None:
        self.outbox_gauges = DatabaseGauges(functools.partial(outbox_reading, self.readers))


def _page_engine(stack: contextlib.AsyncExitStack, settings: Settings, url: str) -> AsyncEngine:
    """The pay page's own small pool on PostgreSQL, without the pre-ping round trip before every
    checkout (the page reader retries once on a connection found dead instead). Small: the hot path
    reads on asyncpg's own pool (payments/page_reader.py); this one serves the pages that need more."""
    engine = create_engine(url, statement_cache=settings.database_statement_cache, pool_pre_ping=False, pool_size=2, max_overflow=2)
    stack.push_async_callback(engine.dispose)
    return engine


def _page_readers(
    stack: contextlib.AsyncExitStack, settings: Settings, url: str, readers: async_sessionmaker[AsyncSession]
) -> async_sessionmaker[AsyncSession]:
    if is_sqlite(url):
        return readers  # the page reader opens its own read-only connection
    return create_session_factory(reader_engine(_page_engine(stack, settings, url)))


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, background: bool = False) -> AsyncIterator[Services]:
    """Open everything; on exit (or if a constructor fails) close what was opened, newest first."""
    async with contextlib.AsyncExitStack() as stack:
        engine = create_engine(settings.database_url, statement_cache=settings.database_statement_cache)
        stack.push_async_callback(engine.dispose)
        sessions = create_session_factory(engine)
        readers = create_session_factory(reader_engine(engine))
        cache = settings.database_statement_cache
        pages = PageReader(settings.database_url, _page_readers(stack, settings, settings.database_url, readers), statement_cache=cache)
        stack.push_async_callback(pages.aclose)
        replica_pages = pages
        if settings.database_read_url:
            replica = create_session_factory(reader_engine(_page_engine(stack, settings, settings.database_read_url)))
            replica_pages = PageReader(settings.database_read_url, replica, statement_cache=cache)
            stack.push_async_callback(replica_pages.aclose)
        events: EventWriter = SqliteBatchWriter(settings) if is_sqlite(settings.database_url) else PgBatchWriter(settings, sessions)
        stack.push_async_callback(events.close)
        services = Services(
            settings=settings,
            engine=engine,
            sessions=sessions,
            readers=readers,
            gateway=StripeGateway(settings),
            pages=pages,
            opens=OpenRecorder(sessions),
            events=events,
            replica_pages=replica_pages,
        )
        if background:
            events.start()
            opens = asyncio.create_task(services.opens.run(), name="opens")
            stack.push_async_callback(_finish, opens, services.opens.stop)
            await _start_sampler(stack, services, "web")
        yield services


async def _start_sampler(stack: contextlib.AsyncExitStack, services: Services, role: str) -> None:
    settings = services.settings
    sampler = UsageSampler(services.sessions, role, settings.usage_sample_seconds, settings.usage_keep_days)
    task = asyncio.create_task(sampler.run(), name=f"usage-{role}")
    stack.push_async_callback(_finish, task, sampler.stop)


# --- what /health/ready and /metrics read --------------------------------------------------------------


@functools.cache
def schema_head(database_url: str) -> str:
    """The migration the code expects (alembic's head), read once from migrations/."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config(database_url)).get_current_head())


async def readiness(services: Services) -> tuple[bool, dict[str, Any]]:
    """Whether this process can serve: the database answers, its schema is at the code's head, and
    no outbox message has waited, due and unclaimed, longer than READY_OUTBOX_STUCK_MINUTES (a
    worker that is gone). Returns (ready, a short body for the answer)."""
    settings = services.settings
    head = await asyncio.to_thread(schema_head, settings.database_url)
    try:
        async with asyncio.timeout(3), services.readers() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("health.database_unreachable error=%s", type(exc).__name__)
        return False, {"status": "unavailable", "reason": "database unreachable"}
    try:
        async with asyncio.timeout(3), services.readers() as session:
            version = (await session.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            now = utcnow()
            due_since = (
                await session.execute(
                    select(func.min(OutboxMessage.next_attempt_at)).where(
                        OutboxMessage.status == OutboxStatus.PENDING,
                        or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now),
                    )
                )
            ).scalar()
    except Exception as exc:
        log.warning("health.not_migrated error=%s", type(exc).__name__)
        return False, {"status": "unavailable", "reason": "database not migrated"}
    if version != head:
        return False, {"status": "unavailable", "reason": f"database schema is at {version}, the code expects {head}"}
    waited = (now - due_since).total_seconds() if due_since is not None else 0.0
    limit = settings.ready_outbox_stuck_minutes
    if limit > 0 and waited > timedelta(minutes=limit).total_seconds():
        return False, {"status": "unavailable", "reason": f"outbox stuck: a message has been due for {waited / 60:.0f} minutes"}
    return True, {"status": "ok", "schema": version, "outbox_due_seconds": round(waited)}


async def outbox_reading(readers: async_sessionmaker[AsyncSession]) -> Reading:
    async with readers() as session:
        pending, oldest = (
            await session.execute(
                select(func.count(), func.min(OutboxMessage.created_at)).where(OutboxMessage.status == OutboxStatus.PENDING)
            )
        ).one()
        dead = (await session.execute(select(func.count()).where(OutboxMessage.status == OutboxStatus.DEAD))).scalar_one()
    age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    return {
        "paylink_outbox_pending": ("Messages waiting to be sent", float(pending)),
        "paylink_outbox_oldest_pending_age_seconds": ("Age of the oldest message waiting to be sent", max(age, 0.0)),
        "paylink_outbox_dead": ("Messages given up on (dead)", float(dead)),
    }


async def _finish(task: asyncio.Task[None], stop: Callable[[], None]) -> None:
    """Ask a background task to finish its work (the last opens are written), cancel it if it hangs."""
    stop()
    done, _ = await asyncio.wait([task], timeout=10)
    if not done:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- the worker process: the outbox loop and the reminder schedule ------------------------------------


async def run_worker(services: Services, stop: asyncio.Event, *, sample_usage: bool = True) -> None:
    """What `python -m emails.worker` runs (and the web app, with OUTBOX_IN_PROCESS): the outbox
    loop, with the invoicing code's policy for dead messages, the reminder schedule and the hourly
    retention purge (outbox bodies, link opens, fresh-link requests), until
    `stop` is set. Each loop finishes the message or reminder in hand before it returns.
    With `sample_usage` (the worker process; not inside the web app, which samples itself) it also
    writes the process's system usage every USAGE_SAMPLE_SECONDS."""
    settings = services.settings
    mail = sender.run_forever(
        services.sessions,
        settings,
        wakeup=services.outbox_wakeup,
        stop=stop,
        on_dead=dead_letter_hook(settings),
        attach=attachment_hook(services),
    )
    async with contextlib.AsyncExitStack() as stack:
        if sample_usage:
            await _start_sampler(stack, services, "worker")
        await asyncio.gather(
            mail,
            _remind_forever(services, stop),
            retention.purge_forever(services.sessions, settings, stop),
            _purge_brakes_forever(services, stop),
        )


async def _purge_brakes_forever(services: Services, stop: asyncio.Event) -> None:
    """The brakes' counter rows older than a day, hourly (a key's own old rows go as it counts)."""
    while not stop.is_set():
        try:
            async with services.sessions.begin() as session:
                await brakes.purge(session)
        except Exception:  # must survive a database hiccup; the error is logged
            log.exception("brakes.purge_error")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=3600)


def attachment_hook(services: Services) -> AttachmentHook:
    """The documents an email carries (INVOICE_PDF_ATTACH): the payments code renders them."""
    return documents.email_attachments(services.sessions, services.settings)


def dead_letter_hook(settings: Settings) -> DeadLetterHook:
    """What a dead message means for its customer and invoice: the invoicing code decides."""
    return functools.partial(apply_dead_message_policy, settings)


async def _remind_forever(services: Services, stop: asyncio.Event) -> None:
    interval = services.settings.reminder_interval_seconds
    if interval <= 0:
        return
    while not stop.is_set():  # a pass at start, then one every interval
        try:
            sent = await reminders.send_due_reminders(services.sessions, services.settings)
            if sent:
                log.info("reminders.queued count=%d", len(sent))
                services.outbox_wakeup.set()
        except Exception:  # the schedule must survive a database hiccup; the error is logged
            log.exception("reminders.loop_error")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)

"""The container: engines, sessions, the Stripe gateway, the page reader and the writers.

One async context manager, `open_services(settings)`, builds them and closes them again, in reverse
order, whatever fails half-way: the web app's lifespan, the CLI, the outbox worker, the tests and
the benchmarks in load/ all open it, so there is one place where the pieces are wired together.

`background=True` (the web app, and the worker for the mail loop) also starts the work that runs
beside requests: the SQLite webhook batch writer and the link-open recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from emails import sender
from emails.outbox import DeadLetterHook
from links import reminders, retention
from links.hooks import apply_dead_message_policy
from links.opens import OpenRecorder
from payments.events import DirectEventWriter, EventWriter
from payments.gateway import StripeGateway
from payments.page_reader import PageReader
from payments.sqlite_batches import SqliteBatchWriter
from plumbing.db import create_engine, create_session_factory, is_sqlite, reader_engine
from plumbing.settings import Settings

log = logging.getLogger("paylink.worker")


@dataclass
class Services:
    """Everything a request, a command or a worker needs, built once."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # read-write (BEGIN IMMEDIATE on SQLite)
    readers: async_sessionmaker[AsyncSession]  # read-only transactions
    gateway: StripeGateway
    pages: PageReader
    opens: OpenRecorder
    events: EventWriter
    # Set after a commit that queued email, so that an in-process outbox loop looks at once.
    outbox_wakeup: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, background: bool = False) -> AsyncIterator[Services]:
    """Open everything; on exit (or if a constructor fails) close what was opened, newest first."""
    async with contextlib.AsyncExitStack() as stack:
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        sessions = create_session_factory(engine)
        readers = create_session_factory(reader_engine(engine))
        pages = PageReader(settings.database_url, readers)
        stack.callback(pages.close)
        events: EventWriter = SqliteBatchWriter(settings) if is_sqlite(settings.database_url) else DirectEventWriter(settings, sessions)
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
        )
        if background:
            events.start()
            opens = asyncio.create_task(services.opens.run(), name="opens")
            stack.push_async_callback(_finish, opens, services.opens.stop)
        yield services


async def _finish(task: asyncio.Task[None], stop: Callable[[], None]) -> None:
    """Ask a background task to finish its work (the last opens are written), cancel it if it hangs."""
    stop()
    done, _ = await asyncio.wait([task], timeout=10)
    if not done:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- the worker process: the outbox loop and the reminder schedule ------------------------------------


async def run_worker(services: Services, stop: asyncio.Event) -> None:
    """What `python -m emails.worker` runs (and the web app, with OUTBOX_IN_PROCESS): the outbox
    loop, with the invoicing code's policy for dead messages, the reminder schedule and the hourly
    retention purge (outbox bodies, link opens, fresh-link requests), until
    `stop` is set. Each loop finishes the message or reminder in hand before it returns."""
    settings = services.settings
    mail = sender.run_forever(services.sessions, settings, wakeup=services.outbox_wakeup, stop=stop, on_dead=dead_letter_hook(settings))
    await asyncio.gather(mail, _remind_forever(services, stop), retention.purge_forever(services.sessions, settings, stop))


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

"""Reading the pay page on the hot path, as cheaply as the database allows.

On SQLite the read runs on a read-only connection, synchronously, right on the event loop: a point
read through an index takes tens of microseconds, WAL readers never wait for writers, and it skips
the thread hop of every aiosqlite call. On PostgreSQL it runs in an async session as usual.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool

from db import is_sqlite
from links.models import InvoiceStatus
from links.service import PayPage, last_successful_payment_sync, pay_page_sync

Receipt = tuple[str | None, str | None, datetime | None]
RECEIPT_STATES = (InvoiceStatus.PAID, InvoiceStatus.REFUNDED, InvoiceStatus.PARTIALLY_REFUNDED)


class PageReader:
    def __init__(self, database_url: str, readers: async_sessionmaker[AsyncSession]) -> None:
        self._readers = readers
        self._engine = _read_only_sqlite(database_url) if is_sqlite(database_url) else None

    async def pay_page(self, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
        if self._engine is not None:
            with Session(self._engine) as session:
                return _read(session, link_id)
        async with self._readers() as session:
            return await session.run_sync(_read, link_id)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _read(session: Session, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
    page = pay_page_sync(session, link_id)
    receipt = last_successful_payment_sync(session, page.invoice.id) if page and page.invoice.status in RECEIPT_STATES else None
    return page, receipt


def _read_only_sqlite(database_url: str) -> Engine:
    path = Path(make_url(database_url).database or "").resolve()
    engine = create_engine(
        f"sqlite+pysqlite:///file:{path}?mode=ro&uri=true",
        poolclass=SingletonThreadPool,  # one connection for the event loop's thread
        connect_args={"check_same_thread": False, "timeout": 1.0},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return engine

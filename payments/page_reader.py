"""What the pay page shows, read on the hot path as cheaply as the database allows.

One indexed read loads link, invoice, customer and the live payment; a second the saved cards. On
SQLite the read runs on a read-only connection, synchronously, right on the event loop: a point
read through an index takes tens of microseconds, WAL readers never wait for writers, and it skips
the thread hop of every aiosqlite call. On PostgreSQL it runs in an async session as usual.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool

from links.issuing import link_with_invoice
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments.models import Payment, PaymentProfile, PaymentStatus
from plumbing.db import is_sqlite


@dataclass(frozen=True)
class SavedCard:
    payment_method_id: str
    brand: str
    last4: str
    exp_month: int | None
    exp_year: int | None
    is_default: bool


@dataclass(frozen=True)
class LivePayment:
    id: uuid.UUID
    status: str


@dataclass(frozen=True)
class PayPage:
    link: PaymentLink
    invoice: Invoice
    customer: Customer
    cards: list[SavedCard]
    live_payment: LivePayment | None


def pay_page_sync(session: Session, link_id: uuid.UUID) -> PayPage | None:
    """Link, invoice, customer and live payment in one indexed read, then the saved cards.

    Synchronous on purpose: on SQLite the page reader runs it on a read-only connection right on
    the event loop (links/pagereader.py); elsewhere it runs inside an async session via run_sync."""

    row = session.execute(
        link_with_invoice(link_id).add_columns(Payment.id, Payment.status).outerjoin(Payment, Payment.live_invoice_id == Invoice.id)
    ).one_or_none()
    if row is None:
        return None
    link, invoice, customer, payment_id, payment_status = row
    cards: list[SavedCard] = []
    if invoice.status == InvoiceStatus.OPEN:
        profiles = session.execute(
            select(PaymentProfile)
            .where(PaymentProfile.customer_id == customer.id, PaymentProfile.reusable.is_(True))
            .order_by(PaymentProfile.is_default.desc(), PaymentProfile.created_at)
        )
        cards = [SavedCard(p.stripe_payment_method_id, p.brand, p.last4, p.exp_month, p.exp_year, p.is_default) for p in profiles.scalars()]
    live = LivePayment(payment_id, payment_status) if payment_id is not None else None
    return PayPage(link, invoice, customer, cards, live)


async def load_pay_page(session: AsyncSession, link_id: uuid.UUID) -> PayPage | None:
    return await session.run_sync(pay_page_sync, link_id)


def last_successful_payment_sync(session: Session, invoice_id: uuid.UUID) -> tuple[str | None, str | None, datetime | None]:
    """Brand, last4 and time of the payment that paid an invoice, for the receipt."""

    row = session.execute(
        select(Payment.brand, Payment.last4, Payment.succeeded_at)
        .where(Payment.invoice_id == invoice_id, Payment.status == PaymentStatus.SUCCEEDED)
        .order_by(Payment.succeeded_at.desc())
        .limit(1)
    ).first()
    return (row[0], row[1], row[2]) if row else (None, None, None)


async def latest_payment_id(session: AsyncSession, link_id: uuid.UUID) -> uuid.UUID | None:
    """The newest payment attempt of the link's invoice (the one a status check asks Stripe about)."""
    query = (
        select(Payment.id)
        .join(PaymentLink, PaymentLink.invoice_id == Payment.invoice_id)
        .where(PaymentLink.id == link_id)
        .order_by(Payment.created_at.desc())
        .limit(1)
    )
    return (await session.execute(query)).scalar_one_or_none()


# --- the page reader: SQLite's read-only connection on the event loop, or an async session ---

Receipt = tuple[str | None, str | None, datetime | None]


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
    receipt = last_successful_payment_sync(session, page.invoice.id) if page and page.invoice.status in InvoiceStatus.HAS_RECEIPT else None
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

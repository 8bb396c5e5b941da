"""What the pay page shows, read on the hot path as cheaply as the database allows.

One indexed read loads link, invoice, customer and the live payment; a second the saved cards. On
SQLite the read runs on a read-only connection, synchronously, right on the event loop: a point
read through an index takes tens of microseconds, WAL readers never wait for writers, and it skips
the thread hop of every aiosqlite call. On PostgreSQL it runs in an async session as usual.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from sqlalchemy import Engine, Select, create_engine, event, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool

from links.issuing import link_with_invoice
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.partial import Allowed, allowed_for, balance_of
from payments.models import Payment, PaymentAllocation, PaymentProfile, PaymentStatus
from payments.payers import may_pay_all, uses_saved_cards
from plumbing.db import is_sqlite, utcnow


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
class OpenInvoice:
    """One of the customer's sent, open invoices, as the pay-all offer lists it."""

    number: str
    balance: int
    due_date: date | None


@dataclass(frozen=True)
class PaidPart:
    """A payment that counted towards the invoice (a part payment, or its share of a pay-all payment)."""

    receipt_number: str | None
    amount: int  # this invoice's share
    paid_at: datetime | None
    total: int  # the whole payment (more than `amount` for a pay-all payment)


@dataclass(frozen=True)
class PayOptions:
    """What the pay form offers besides "pay the balance": another amount within the rules (links/partial.py),
    and every open invoice of the customer in one charge."""

    balance: int
    allowed: Allowed
    open_invoices: list[OpenInvoice] = field(default_factory=list)  # this one included; offered when 2 or more
    paid_parts: list[PaidPart] = field(default_factory=list)
    allocation: list[tuple[str, int]] = field(default_factory=list)  # the receipt's pay-all payment: which invoice got what

    @property
    def pay_all_total(self) -> int:
        return sum(i.balance for i in self.open_invoices)

    @property
    def offers_pay_all(self) -> bool:
        return len(self.open_invoices) >= 2


@dataclass(frozen=True)
class PayPage:
    link: PaymentLink
    invoice: Invoice
    customer: Customer
    cards: list[SavedCard]
    live_payment: LivePayment | None
    options: PayOptions | None = None


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
    if payment_id is None and invoice.status in InvoiceStatus.UNSETTLED:
        # A pay-all attempt holds this invoice's slot through its allocation.
        held = session.execute(
            select(Payment.id, Payment.status)
            .join(PaymentAllocation, PaymentAllocation.payment_id == Payment.id)
            .where(PaymentAllocation.live_invoice_id == invoice.id)
        ).first()
        if held is not None:
            payment_id, payment_status = held
    cards: list[SavedCard] = []
    if invoice.status in InvoiceStatus.PAYABLE and uses_saved_cards(link):
        profiles = session.execute(
            select(PaymentProfile)
            .where(PaymentProfile.customer_id == customer.id, PaymentProfile.reusable.is_(True))
            .order_by(PaymentProfile.is_default.desc(), PaymentProfile.created_at)
        )
        cards = [SavedCard(p.stripe_payment_method_id, p.brand, p.last4, p.exp_month, p.exp_year, p.is_default) for p in profiles.scalars()]
    live = LivePayment(payment_id, payment_status) if payment_id is not None else None
    return PayPage(link, invoice, customer, cards, live, _options(session, link, invoice))


def _options(session: Session, link: PaymentLink, invoice: Invoice) -> PayOptions:
    """Balance, part-payment window, what was paid so far, and the customer's other open invoices
    (never on a colleague's link: payments/payers.py)."""
    balance = balance_of(invoice.amount_due, invoice.amount_paid) if invoice.status in InvoiceStatus.UNSETTLED else 0
    parts = _paid_parts(session, invoice) if invoice.amount_paid > 0 else []
    others: list[OpenInvoice] = []
    if invoice.status in InvoiceStatus.PAYABLE and may_pay_all(link):
        others = [
            OpenInvoice(number, balance_of(due, paid), due_date)
            for number, due, paid, due_date in session.execute(
                select(Invoice.number, Invoice.amount_due, Invoice.amount_paid, Invoice.due_date)
                .where(Invoice.id.in_(pay_all_invoices(invoice.customer_id, invoice.currency)))
                .order_by(Invoice.due_date.is_(None), Invoice.due_date, Invoice.number)
            )
            if due > paid
        ]
        if invoice.number not in {o.number for o in others}:
            others = []  # this invoice is not among them (e.g. never emailed): no offer from its page
    allocation: list[tuple[str, int]] = []
    if invoice.status in InvoiceStatus.HAS_RECEIPT and parts and parts[0].total != parts[0].amount:
        allocation = _allocation_of(session, invoice)
    return PayOptions(balance, allowed_for(invoice), others, parts, allocation)


def pay_all_invoices(customer_id: uuid.UUID, currency: str) -> Select[uuid.UUID]:
    """The ids of the customer's invoices that pay-all pays (payments/checkout.py uses the same
    rule, under the invoices' row locks): payable, in `currency`, with a live link that was emailed
    to the customer (never one held for an unconfirmed address, never a void one)."""
    now = utcnow()
    sent_link = (
        select(PaymentLink.id)
        .where(
            PaymentLink.invoice_id == Invoice.id,
            PaymentLink.sent_at.is_not(None),
            PaymentLink.revoked_at.is_(None),
            PaymentLink.expires_at > now,
            PaymentLink.recipient_email.is_(None),
        )
        .exists()
    )
    return select(Invoice.id).where(
        Invoice.customer_id == customer_id, Invoice.currency == currency, Invoice.status.in_(InvoiceStatus.PAYABLE), sent_link
    )


def _paid_parts(session: Session, invoice: Invoice) -> list[PaidPart]:
    """The payments that counted towards the invoice, newest first, with this invoice's share of each."""
    own = select(Payment.receipt_number, Payment.amount, Payment.succeeded_at, Payment.amount).where(
        Payment.invoice_id == invoice.id, Payment.scope != "all", Payment.status == PaymentStatus.SUCCEEDED,
        Payment.currency == invoice.currency,
    )  # fmt: skip
    shares = (
        select(Payment.receipt_number, PaymentAllocation.amount, Payment.succeeded_at, Payment.amount)
        .join(PaymentAllocation, PaymentAllocation.payment_id == Payment.id)
        .where(PaymentAllocation.invoice_id == invoice.id, Payment.status == PaymentStatus.SUCCEEDED, Payment.currency == invoice.currency)
    )
    parts = [PaidPart(*row) for query in (own, shares) for row in session.execute(query)]
    return sorted(parts, key=lambda p: p.paid_at or datetime.min.replace(tzinfo=UTC), reverse=True)


def _allocation_of(session: Session, invoice: Invoice) -> list[tuple[str, int]]:
    """Which invoice got what of the latest pay-all payment that paid this invoice."""
    latest = session.execute(
        select(Payment.id)
        .join(PaymentAllocation, PaymentAllocation.payment_id == Payment.id)
        .where(PaymentAllocation.invoice_id == invoice.id, Payment.status == PaymentStatus.SUCCEEDED)
        .order_by(Payment.succeeded_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    if latest is None:
        return []
    rows = session.execute(
        select(Invoice.number, PaymentAllocation.amount)
        .join(Invoice, Invoice.id == PaymentAllocation.invoice_id)
        .where(PaymentAllocation.payment_id == latest)
        .order_by(Invoice.number)
    )
    return [(number, amount) for number, amount in rows]


async def load_pay_page(session: AsyncSession, link_id: uuid.UUID) -> PayPage | None:
    return await session.run_sync(pay_page_sync, link_id)


def last_successful_payment_sync(session: Session, invoice_id: uuid.UUID) -> tuple[str | None, str | None, datetime | None]:
    """Brand, last4 and time of the payment that paid an invoice, for the receipt."""

    allocated = select(PaymentAllocation.payment_id).where(PaymentAllocation.invoice_id == invoice_id)
    row = session.execute(
        select(Payment.brand, Payment.last4, Payment.succeeded_at)
        .where(or_(Payment.invoice_id == invoice_id, Payment.id.in_(allocated)), Payment.status == PaymentStatus.SUCCEEDED)
        .order_by(Payment.succeeded_at.desc())
        .limit(1)
    ).first()
    return (row[0], row[1], row[2]) if row else (None, None, None)


async def latest_payment_id(session: AsyncSession, link_id: uuid.UUID) -> uuid.UUID | None:
    """The newest payment attempt of the link's invoice (the one a status check asks Stripe about):
    its own, or a pay-all attempt that included it."""
    invoice_id = select(PaymentLink.invoice_id).where(PaymentLink.id == link_id).scalar_subquery()
    allocated = select(PaymentAllocation.payment_id).where(PaymentAllocation.invoice_id == invoice_id)
    query = (
        select(Payment.id)
        .where(or_(Payment.invoice_id == invoice_id, Payment.id.in_(allocated)))
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

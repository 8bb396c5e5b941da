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


# --- the one read: every statement built once, at import, with the link's id as a bind parameter ---
#
# Link, invoice, customer, the live payment (its own, or a pay-all allocation holding the invoice) and
# how many of the customer's invoices pay-all would pay, in one indexed Core select on a connection
# (no Session, no unit of work, no identity map); the saved cards in a second (only when the page can
# show them). The rows become instances of the mapped classes without the ORM: their loaded state is
# exactly the selected columns (what `sqlalchemy.inspect(row).dict` would hold), so the templates,
# payments/payers.py, links/partial.py and the page cache's key read them as they read ORM rows.

_NOW = bindparam("now", type_=PaymentLink.__table__.c.expires_at.type)
_LINK_ID = bindparam("link_id", type_=PaymentLink.__table__.c.id.type)


def _columns(model: type[Any]) -> tuple[tuple[str, ...], list[Any]]:
    attrs = [a for a in inspect(model).column_attrs]
    return tuple(a.key for a in attrs), [a.columns[0] for a in attrs]


_LINK_KEYS, _LINK_COLUMNS = _columns(PaymentLink)
_INVOICE_KEYS, _INVOICE_COLUMNS = _columns(Invoice)
_CUSTOMER_KEYS, _CUSTOMER_COLUMNS = _columns(Customer)


def _pay_all_set(customer_id: Any, currency: Any, now: Any) -> Select[uuid.UUID]:
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


def _page_statement() -> Select[Any]:
    page_invoice = aliased(Invoice, name="page_invoice")
    held = aliased(Payment, name="held")
    holding = (
        select(held.id, held.status)
        .join(PaymentAllocation, PaymentAllocation.payment_id == held.id)
        .where(PaymentAllocation.live_invoice_id == page_invoice.id)
        .limit(1)
    )
    other = aliased(Invoice, name="other")
    other_link = aliased(PaymentLink, name="other_link")
    payable_others = (
        select(func.count())
        .select_from(other)
        .where(
            other.customer_id == page_invoice.customer_id,
            other.currency == page_invoice.currency,
            other.status.in_(InvoiceStatus.PAYABLE),
            other.amount_due > other.amount_paid,
            select(other_link.id)
            .where(
                other_link.invoice_id == other.id,
                other_link.sent_at.is_not(None),
                other_link.revoked_at.is_(None),
                other_link.expires_at > _NOW,
                other_link.recipient_email.is_(None),
            )
            .exists(),
        )
        .scalar_subquery()
    )
    link_table, invoice_table = PaymentLink.__table__, page_invoice
    invoice_columns = [getattr(page_invoice, key) for key in _INVOICE_KEYS]
    return (
        select(
            *_LINK_COLUMNS,
            *invoice_columns,
            *_CUSTOMER_COLUMNS,
            Payment.id,
            Payment.status,
            holding.with_only_columns(held.id).scalar_subquery(),
            holding.with_only_columns(held.status).scalar_subquery(),
            payable_others,
        )
        .select_from(link_table)
        .join(invoice_table, page_invoice.id == PaymentLink.invoice_id)
        .join(Customer, Customer.id == page_invoice.customer_id)
        .outerjoin(Payment, Payment.live_invoice_id == page_invoice.id)
        .where(PaymentLink.id == _LINK_ID)
        .limit(1)
    )


PAGE = _page_statement()
CARDS = (
    select(
        PaymentProfile.stripe_payment_method_id,
        PaymentProfile.brand,
        PaymentProfile.last4,
        PaymentProfile.exp_month,
        PaymentProfile.exp_year,
        PaymentProfile.is_default,
    )
    .where(PaymentProfile.customer_id == bindparam("customer_id", type_=PaymentProfile.__table__.c.customer_id.type))
    .where(PaymentProfile.reusable.is_(True))
    .order_by(PaymentProfile.is_default.desc(), PaymentProfile.created_at)
)
PAY_ALL = (
    select(Invoice.number, Invoice.amount_due, Invoice.amount_paid, Invoice.due_date)
    .where(
        Invoice.id.in_(
            _pay_all_set(
                bindparam("customer_id", type_=Invoice.__table__.c.customer_id.type),
                bindparam("currency", type_=Invoice.__table__.c.currency.type),
                _NOW,
            )
        )
    )
    .order_by(Invoice.due_date.is_(None), Invoice.due_date, Invoice.number)
)


def _row_object(model: type[_M], keys: tuple[str, ...], values: Sequence[Any]) -> _M:
    """An instance of a mapped class holding `values`, without the ORM's bookkeeping (read-only: never
    added to a session). Mapped attributes read the instance's dict first; properties work as usual."""
    row = model.__new__(model)
    row.__dict__.update(zip(keys, values, strict=True))
    return row


def read_page(connection: Connection, link_id: uuid.UUID) -> PayPage | None:
    """The page's data in one indexed read (and the saved cards in a second, when shown).

    Synchronous on purpose: on SQLite the page reader runs it on a read-only connection right on
    the event loop; on PostgreSQL on an async connection via run_sync."""
    now = utcnow()
    row = connection.execute(PAGE, {"link_id": link_id, "now": now}).first()
    if row is None:
        return None
    a, b, c = len(_LINK_KEYS), len(_LINK_KEYS) + len(_INVOICE_KEYS), len(_LINK_KEYS) + len(_INVOICE_KEYS) + len(_CUSTOMER_KEYS)
    link = _row_object(PaymentLink, _LINK_KEYS, row[:a])
    invoice = _row_object(Invoice, _INVOICE_KEYS, row[a:b])
    customer = _row_object(Customer, _CUSTOMER_KEYS, row[b:c])
    payment_id, payment_status, held_id, held_status, payable_count = row[c:]
    if payment_id is None and invoice.status in InvoiceStatus.UNSETTLED and held_id is not None:
        payment_id, payment_status = held_id, held_status  # a pay-all attempt holds this invoice's slot
    cards: list[SavedCard] = []
    if invoice.status in InvoiceStatus.PAYABLE and uses_saved_cards(link):
        cards = [SavedCard(*card) for card in connection.execute(CARDS, {"customer_id": customer.id})]
    live = LivePayment(payment_id, payment_status) if payment_id is not None else None
    return PayPage(link, invoice, customer, cards, live, _options(connection, link, invoice, payable_count or 0, now))


def pay_page_sync(session: Session, link_id: uuid.UUID) -> PayPage | None:
    """`read_page` inside an ORM session (its connection and transaction)."""
    return read_page(session.connection(), link_id)


def _options(connection: Connection, link: PaymentLink, invoice: Invoice, payable_count: int, now: datetime) -> PayOptions:
    """Balance, part-payment window, what was paid so far, and the customer's other open invoices
    (never on a colleague's link: payments/payers.py; listed only when there are two or more)."""
    balance = balance_of(invoice.amount_due, invoice.amount_paid) if invoice.status in InvoiceStatus.UNSETTLED else 0
    parts = _paid_parts(connection, invoice) if invoice.amount_paid > 0 else []
    others: list[OpenInvoice] = []
    if payable_count >= 2 and invoice.status in InvoiceStatus.PAYABLE and may_pay_all(link):
        query = connection.execute(PAY_ALL, {"customer_id": invoice.customer_id, "currency": invoice.currency, "now": now})
        others = [OpenInvoice(number, balance_of(due, paid), due_date) for number, due, paid, due_date in query if due > paid]
        if invoice.number not in {o.number for o in others}:
            others = []  # this invoice is not among them (e.g. never emailed): no offer from its page
    allocation: list[tuple[str, int]] = []
    if invoice.status in InvoiceStatus.HAS_RECEIPT and parts and parts[0].total != parts[0].amount:
        allocation = _allocation_of(connection, invoice)
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

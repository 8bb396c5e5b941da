"""What the pay page shows, read on the hot path as cheaply as the database allows.

One indexed Core select (built once, at import) loads link, invoice, customer, the live payment, the
saved cards and how many invoices pay-all would pay; more only for a page that shows more
(part payments, a receipt, two or more open invoices). On SQLite the read runs on a read-only
connection, synchronously, right on the event loop: a point read through an index takes tens of
microseconds, WAL readers never wait for writers, and it skips the thread hop of every aiosqlite
call. On PostgreSQL it runs on one async connection (no ORM session).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Select,
    and_,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    or_,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool

from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.partial import Allowed, allowed_for, balance_of
from payments.models import Payment, PaymentAllocation, PaymentProfile, PaymentStatus
from payments.payers import may_pay_all, uses_saved_cards
from plumbing.db import Prepared, is_sqlite, utcnow

_M = TypeVar("_M")
log = logging.getLogger("paylink.page_reader")


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
    amount: int  # what this attempt charges (a part, the balance, or a pay-all total), in minor units


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
# Link, invoice, customer, the live payment (its own, or a pay-all allocation holding the invoice),
# how many of the customer's invoices pay-all would pay, and the saved cards (one row per card), in
# one indexed Core select on a connection (no Session, no unit of work, no identity map). The rows
# become instances of the mapped classes without the ORM: their loaded state is exactly the selected
# columns (what `sqlalchemy.inspect(row).dict` would hold), so the templates, payments/payers.py,
# links/partial.py and the page cache's key read them as they read ORM rows.

_NOW = bindparam("now", type_=PaymentLink.__table__.c.expires_at.type)
_LINK_ID = bindparam("link_id", type_=PaymentLink.__table__.c.id.type)
# In the SQL text itself, not an expanding parameter (that one is re-rendered on every execution).
assert all(status.isidentifier() for status in InvoiceStatus.PAYABLE)
_PAYABLE_LITERALS: list[Any] = [literal_column(f"'{status}'") for status in InvoiceStatus.PAYABLE]


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


def _page_statement(which: Any = None) -> Select[Any]:
    """PAGE: the rows of the link `_LINK_ID` (or of every link `which` selects: PAGE_MANY)."""
    links, invoices, customers = PaymentLink.__table__, Invoice.__table__, Customer.__table__
    payments, allocations, profiles = Payment.__table__, PaymentAllocation.__table__, PaymentProfile.__table__
    held = payments.alias("held")  # a pay-all attempt holding this invoice's live slot (at most one: unique)
    other, other_link = invoices.alias("other"), links.alias("other_link")
    sent_link = (
        select(other_link.c.id)
        .where(
            other_link.c.invoice_id == other.c.id,
            other_link.c.sent_at.is_not(None),
            other_link.c.revoked_at.is_(None),
            other_link.c.expires_at > _NOW,
            other_link.c.recipient_email.is_(None),
        )
        .exists()
    )
    payable_others = (
        select(func.count())
        .select_from(other)
        .where(
            other.c.customer_id == invoices.c.customer_id,
            other.c.currency == invoices.c.currency,
            other.c.status.in_(_PAYABLE_LITERALS),
            other.c.amount_due > other.c.amount_paid,
            sent_link,
        )
        .scalar_subquery()
    )
    return (
        select(
            *_LINK_COLUMNS,
            *_INVOICE_COLUMNS,
            *_CUSTOMER_COLUMNS,
            payments.c.id,
            payments.c.status,
            payments.c.amount,
            held.c.id,
            held.c.status,
            held.c.amount,
            payable_others,
            profiles.c.stripe_payment_method_id,
            profiles.c.brand,
            profiles.c.last4,
            profiles.c.exp_month,
            profiles.c.exp_year,
            profiles.c.is_default,
        )
        .select_from(
            links.join(invoices, invoices.c.id == links.c.invoice_id)
            .join(customers, customers.c.id == invoices.c.customer_id)
            .outerjoin(payments, payments.c.live_invoice_id == invoices.c.id)  # at most one (a unique key)
            .outerjoin(allocations, allocations.c.live_invoice_id == invoices.c.id)  # at most one (a unique key)
            .outerjoin(held, held.c.id == allocations.c.payment_id)
            .outerjoin(profiles, and_(profiles.c.customer_id == customers.c.id, profiles.c.reusable.is_(True)))
        )
        .where(links.c.id == _LINK_ID if which is None else which)
        .order_by(profiles.c.is_default.desc(), profiles.c.created_at)
    )


PAGE = _page_statement()
# PostgreSQL: PAGE of several links in one statement (views/hot_path.py's reads gathered: _Gathered).
_LINK_IDS = bindparam("link_ids", type_=ARRAY(PaymentLink.__table__.c.id.type))
PAGE_MANY = _page_statement(PaymentLink.__table__.c.id == any_(_LINK_IDS))
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
    """The page's data in one indexed read (one row per saved card), and more reads for a page that needs them.

    Synchronous on purpose: on SQLite the page reader runs it on a read-only connection right on
    the event loop; on PostgreSQL on an async connection via run_sync."""
    now = utcnow()
    rows = connection.execute(PAGE, {"link_id": link_id, "now": now}).all()
    return _page_of(rows, now, connection) if rows else None


_A = len(_LINK_KEYS)
_B = _A + len(_INVOICE_KEYS)
_C = _B + len(_CUSTOMER_KEYS)
_STATUS, _AMOUNT_PAID = _A + _INVOICE_KEYS.index("status"), _A + _INVOICE_KEYS.index("amount_paid")
_PAYABLE_COUNT = _C + 6  # then the card's columns (one row per saved card, or one with none)


_UNSHOWN = tuple(i for i, key in enumerate(_LINK_KEYS) if key in PaymentLink.OPEN_COUNTERS)
_CUSTOMER_LOCALE = _B + _CUSTOMER_KEYS.index("locale")


@dataclass(frozen=True, slots=True)
class PageRows:
    """PAGE's rows for a link as the driver returned them (no type processing), with the open counters
    blanked: what the page shows, as cheap as it can be read. For the pay page's hot path
    (views/hot_path.py), which keys its cache by them; a page that needs more than PAGE has none."""

    rows: tuple[tuple[Any, ...], ...]
    locale: str | None  # the customer's stored locale
    read: tuple[Sequence[Any], ...] = field(compare=False, repr=False)  # as read (counters too): `PageReader.page_of`
    # The page cache's keys of these very rows (views/page_cache.PageCache.fast_key_of): one PageRows serves
    # every request of a gathered batch (PostgreSQL) or of a remembered read (SQLite), keyed once.
    keys: dict[Any, bytes] = field(default_factory=dict, compare=False, repr=False)


def _page_rows(rows: Sequence[Sequence[Any]]) -> PageRows | None:
    if not rows or _needs_more_reads(rows[0]):
        return None
    first = list(rows[0])
    for index in _UNSHOWN:
        first[index] = None
    locale = first[_CUSTOMER_LOCALE]
    return PageRows((tuple(first), *map(tuple, rows[1:])), locale if isinstance(locale, str) else None, tuple(rows))


def _needs_more_reads(row: Sequence[Any]) -> bool:
    """Whether the page of PAGE's `row` needs more than PAGE: what was paid (part payments,
    a receipt) or the list of invoices pay-all would pay."""
    return bool(row[_AMOUNT_PAID]) or row[_STATUS] in InvoiceStatus.HAS_RECEIPT or (row[_PAYABLE_COUNT] or 0) >= 2


def _shows_cards(link: PaymentLink, invoice: Invoice) -> bool:
    return invoice.status in InvoiceStatus.PAYABLE and uses_saved_cards(link)


def _page_of(rows: Sequence[Sequence[Any]], now: datetime, connection: Connection | None) -> PayPage:
    """The page of PAGE's `rows` (the same page, one row per saved card)."""
    row = rows[0]
    link = _row_object(PaymentLink, _LINK_KEYS, row[:_A])
    invoice = _row_object(Invoice, _INVOICE_KEYS, row[_A:_B])
    customer = _row_object(Customer, _CUSTOMER_KEYS, row[_B:_C])
    payment_id, payment_status, payment_amount, held_id, held_status, held_amount, payable_count = row[_C : _PAYABLE_COUNT + 1]
    if payment_id is None and invoice.status in InvoiceStatus.UNSETTLED and held_id is not None:
        payment_id, payment_status, payment_amount = held_id, held_status, held_amount  # a pay-all attempt holds this invoice's slot
    cards: list[SavedCard] = []
    if _shows_cards(link, invoice):
        cards = [SavedCard(*card[_PAYABLE_COUNT + 1 :]) for card in rows if card[_PAYABLE_COUNT + 1] is not None]
    live = LivePayment(payment_id, payment_status, payment_amount) if payment_id is not None else None
    return PayPage(link, invoice, customer, cards, live, _options(connection, link, invoice, payable_count or 0, now))


def pay_page_sync(session: Session, link_id: uuid.UUID) -> PayPage | None:
    """`read_page` inside an ORM session (its connection and transaction)."""
    return read_page(session.connection(), link_id)


def _options(connection: Connection | None, link: PaymentLink, invoice: Invoice, payable_count: int, now: datetime) -> PayOptions:
    """Balance, part-payment window, what was paid so far, and the customer's other open invoices
    (never on a colleague's link: payments/payers.py; listed only when there are two or more).
    `connection` is only used when `_needs_more_reads` says so (None: it says not)."""
    balance = balance_of(invoice.amount_due, invoice.amount_paid) if invoice.status in InvoiceStatus.UNSETTLED else 0
    parts: list[PaidPart] = []
    if invoice.amount_paid > 0:
        assert connection is not None
        parts = _paid_parts(connection, invoice)
    others: list[OpenInvoice] = []
    if payable_count >= 2 and invoice.status in InvoiceStatus.PAYABLE and may_pay_all(link):
        assert connection is not None
        query = connection.execute(PAY_ALL, {"customer_id": invoice.customer_id, "currency": invoice.currency, "now": now})
        others = [OpenInvoice(number, balance_of(due, paid), due_date) for number, due, paid, due_date in query if due > paid]
        if invoice.number not in {o.number for o in others}:
            others = []  # this invoice is not among them (e.g. never emailed): no offer from its page
    allocation: list[tuple[str, int]] = []
    if invoice.status in InvoiceStatus.HAS_RECEIPT and parts and parts[0].total != parts[0].amount:
        assert connection is not None
        allocation = _allocation_of(connection, invoice)
    return PayOptions(balance, allowed_for(invoice), others, parts, allocation)


def pay_all_invoices(customer_id: uuid.UUID, currency: str) -> Select[uuid.UUID]:
    """The ids of the customer's invoices that pay-all pays (payments/checkout.py uses the same
    rule, under the invoices' row locks; the page's read counts them the same way): payable, in
    `currency`, with a live link that was emailed to the customer (never one held for an unconfirmed
    address, never a void one)."""
    return _pay_all_set(customer_id, currency, utcnow())


def _paid_parts(session: Connection, invoice: Invoice) -> list[PaidPart]:
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


def _allocation_of(session: Connection, invoice: Invoice) -> list[tuple[str, int]]:
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


def last_successful_payment_sync(session: Connection | Session, invoice_id: uuid.UUID) -> tuple[str | None, str | None, datetime | None]:
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


# What a pooled asyncpg connection the server closed raises on use (a restart, a failover).
DEAD_CONNECTION = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, OSError)


class _DeadConnection(Exception):
    """The pooled connection was closed by the server; it has been invalidated."""


ROWS_MEMO_LINKS = 256  # SQLite: the links whose latest rows are remembered (~1 MB), see _RawReads
ROWS_MEMO_SECONDS = 1.0
ROWS_POOL_SIZE = 4  # connections per process at most (opened as needed, then kept): README, Operations
ROWS_POOL_RETRY_SECONDS = 60  # after the pool could not be opened (the general read serves meanwhile)
ROWS_TIMEOUT_SECONDS = 5.0  # a read that takes longer gives up (the general read then answers)


class PageReader:
    """The page's read: on SQLite a read-only connection used synchronously on the event loop; else one
    async connection of the readers' engine per read (no ORM session)."""

    def __init__(self, database_url: str, readers: async_sessionmaker[AsyncSession], *, statement_cache: bool = True) -> None:
        self._engine = _read_only_sqlite(database_url) if is_sqlite(database_url) else None
        self._statement_cache = statement_cache  # off behind PgBouncer (DATABASE_STATEMENT_CACHE=off)
        self._rows_pool: asyncpg.Pool | None = None
        self._rows_pool_retry_at = 0.0
        self._rows_lock = asyncio.Lock()
        bind = readers.kw.get("bind")
        if self._engine is None and not isinstance(bind, AsyncEngine):
            raise TypeError("the readers' session factory must be bound to an AsyncEngine")
        self._async_engine: AsyncEngine | None = bind if self._engine is None else None
        self._raw: _RawReads | None = None
        self._pg: Prepared | None = None
        self._pg_many: Prepared | None = None
        self._gathered: _Gathered | None = None

    async def pay_page(self, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
        if self._engine is not None:
            return self._sqlite_page(link_id)
        try:
            return await self._async_page(link_id)
        except _DeadConnection:
            # The page's pool skips the pre-ping round trip (services._page_engine): a connection the
            # server closed (a restart, a failover) is found here, invalidated, and the read tried once more.
            return await self._async_page(link_id)

    async def page_rows(self, link_id: uuid.UUID) -> PageRows | None:
        """PAGE's raw rows for the link (`PageRows`), or None: no such link, a page that needs more reads
        than PAGE, or a database where the raw read does not apply (then `pay_page` is the way)."""
        if self._engine is not None:
            if self._raw is None:
                self._raw = _RawReads(self._engine)
            return self._raw.page_rows(link_id, utcnow())
        gathered = self._gathered or await self._open_rows_pool()
        if gathered is None:
            return None
        return await gathered.rows(link_id)

    def page_of(self, rows: PageRows) -> PayPage:
        """The page data of `rows` as `page_rows` read them (the page the hot path keyed by them)."""
        statement = self._raw.page if self._raw is not None else self._pg_many
        assert statement is not None
        return _page_of([statement.row(row) for row in rows.read], utcnow(), None)

    async def _open_rows_pool(self) -> _Gathered | None:
        """asyncpg's own pool for the raw read (no SQLAlchemy checkout, no greenlet: the read is most of a
        cached page's cost), opened once (connections as needed, up to ROWS_POOL_SIZE, then kept). None
        where the raw read does not apply: another driver, no statement cache (behind PgBouncer), or the
        pool could not be opened lately (then the general read serves, and it is tried again later)."""
        assert self._async_engine is not None
        if self._async_engine.dialect.driver != "asyncpg" or not self._statement_cache:
            return None
        if time.monotonic() < self._rows_pool_retry_at:
            return None
        async with self._rows_lock:
            if self._rows_pool is None and time.monotonic() >= self._rows_pool_retry_at:
                dialect: Any = self._async_engine.dialect
                if self._pg_many is None:
                    self._pg_many = Prepared(PAGE_MANY, dialect)
                try:
                    params = _connect_params(dialect, self._async_engine.url)
                    init = _rows_connection(dialect)
                    self._rows_pool = await asyncpg.create_pool(**params, min_size=1, max_size=ROWS_POOL_SIZE, init=init)
                except Exception as exc:
                    self._rows_pool_retry_at = time.monotonic() + ROWS_POOL_RETRY_SECONDS
                    log.warning("page_reader.rows_pool_failed retry_in_s=%d error=%s", ROWS_POOL_RETRY_SECONDS, type(exc).__name__)
                    return None
                self._gathered = _Gathered(self._rows_pool, self._pg_many)
        return self._gathered

    async def _async_page(self, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
        assert self._async_engine is not None
        async with self._async_engine.connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            if self._async_engine.dialect.driver != "asyncpg" or not _caches_statements(driver):
                # Behind PgBouncer (DATABASE_STATEMENT_CACHE=off) every statement runs in SQLAlchemy's
                # transaction, so that its prepare and execute reach the same server connection.
                return await connection.run_sync(_read, link_id)
            # asyncpg: PAGE straight on the driver's connection (as on SQLite, see _sqlite_page).
            if self._pg is None:
                self._pg = Prepared(PAGE, self._async_engine.dialect)
            statement = self._pg
            now = utcnow()
            try:
                records = await driver.fetch(statement.sql, *statement.args({"link_id": link_id, "now": now}))
            except DEAD_CONNECTION as exc:
                await connection.invalidate(exc)
                raise _DeadConnection() from exc
            if not records:
                return None, None
            rows = [statement.row(record) for record in records]
            if _needs_more_reads(rows[0]):
                return await connection.run_sync(_read, link_id)
            return _page_of(rows, now, None), None

    def _sqlite_page(self, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
        """PAGE straight on the DB-API connection (SQLAlchemy's own execution costs several times the
        query); a page that needs more reads goes the general way."""
        assert self._engine is not None
        if self._raw is None:
            self._raw = _RawReads(self._engine)
        now = utcnow()
        rows = self._raw.page.all(self._raw.connection, {"link_id": link_id, "now": now})
        if not rows:
            return None, None
        if _needs_more_reads(rows[0]):
            with self._engine.connect() as connection:
                return _read(connection, link_id)
        return _page_of(rows, now, None), None

    async def aclose(self) -> None:
        if self._rows_pool is not None:
            pool, self._rows_pool, self._gathered = self._rows_pool, None, None
            await pool.close()
        self.close()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._engine is not None:
            self._engine.dispose()


_LINK_ID_INDEX = _LINK_KEYS.index("id")
GATHERED_IN_FLIGHT = 2  # statements of gathered reads running at once, per process (each on a pool connection)


class _Gathered:
    """PostgreSQL: the hot path's reads asked for at about the same time, run as one statement (PAGE_MANY).

    A read joins the batch that is still being gathered (not yet sent) and shares its link's rows with
    any other read of the same link in it; a batch is sent on the event loop's next turn when fewer
    than GATHERED_IN_FLIGHT are running, else as soon as one finishes. A batch is only ever sent after
    every read in it was asked for, so each read still sees every commit made before its request came
    (never the answer of a statement that had already started). On payday this turns 32 concurrent
    opens of one link into one statement, and of 32 links into a few: PostgreSQL's cost per statement
    (parse, bind, a round trip: most of a point read's cost) is paid once per batch."""

    def __init__(self, pool: asyncpg.Pool, statement: Prepared) -> None:
        self._pool = pool
        self._statement = statement
        self._waiting: dict[uuid.UUID, asyncio.Future[PageRows | None]] = {}  # the batch being gathered
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def rows(self, link_id: uuid.UUID) -> PageRows | None:
        """PAGE's rows of the link (`_page_rows`: None for no such link, or a page that needs more reads),
        one PageRows shared by every read of the link in the batch."""
        future = self._waiting.get(link_id)
        if future is None:
            future = self._waiting[link_id] = asyncio.get_running_loop().create_future()
            self._schedule()
        # Shielded: one request given up (a client gone) must not cancel the others waiting for this link.
        return await asyncio.shield(future)

    def _schedule(self) -> None:
        if not self._scheduled and self._in_flight < GATHERED_IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if not self._waiting or self._in_flight >= GATHERED_IN_FLIGHT:
            return
        batch, self._waiting = self._waiting, {}
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[uuid.UUID, asyncio.Future[PageRows | None]]) -> None:
        error: Exception | None = None
        try:
            # The whole batch, waiting for a connection included (asyncpg's fetch timeout covers only the query).
            async with asyncio.timeout(ROWS_TIMEOUT_SECONDS):
                args = self._statement.args({"link_ids": list(batch), "now": utcnow()})
                try:
                    records = await self._pool.fetch(self._statement.sql, *args)
                except DEAD_CONNECTION as exc:
                    if isinstance(exc, TimeoutError):  # (an OSError too) a slow read is not retried
                        raise
                    # A connection the server closed (a restart, a failover): the pool replaces it; once more.
                    records = await self._pool.fetch(self._statement.sql, *args)
            by_link: dict[str, list[Any]] = {}
            for record in records:
                by_link.setdefault(record[_LINK_ID_INDEX].hex, []).append(record)
            for link_id, future in batch.items():
                if not future.done():
                    future.set_result(_page_rows(by_link.get(link_id.hex, [])))
        except Exception as exc:  # every read of the batch fails with it (the general way answers them)
            error = exc
        finally:
            self._in_flight -= 1
            for future in batch.values():  # none is ever left waiting (a cancelled batch: shutting down)
                if not future.done():
                    future.set_exception(error or ConnectionError("the page read was given up"))
            if self._waiting:
                self._schedule()


def _read(connection: Connection, link_id: uuid.UUID) -> tuple[PayPage | None, Receipt | None]:
    page = read_page(connection, link_id)
    paid = page is not None and page.invoice.status in InvoiceStatus.HAS_RECEIPT
    receipt = last_successful_payment_sync(connection, page.invoice.id) if page is not None and paid else None
    return page, receipt


def _connect_params(dialect: Any, url: URL) -> dict[str, Any]:
    """What SQLAlchemy's asyncpg dialect passes to `asyncpg.connect` for `url` (host, port, user,
    password, database and the URL's query options such as `ssl`), without its own adapter options."""
    _, params = dialect.create_connect_args(url)
    for adapter_option in ("async_creator_fn", "prepared_statement_cache_size", "prepared_statement_name_func"):
        params.pop(adapter_option, None)
    return dict(params)


class _Adapted:
    """What the dialect's codec set-up expects of a connection (SQLAlchemy's adapter around asyncpg's)."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection


def _rows_connection(dialect: Any) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """Each connection of the hot read's pool as SQLAlchemy's would be (the same JSON codecs: the same
    values come back), with one plan for every link: PostgreSQL's default ("auto") went on planning
    PAGE anew on many executions (~0.7 ms each); with 16 concurrent readers its CPU per read fell from
    ~223 to ~155 us (measured in this session, /tmp scripts; README, Operations)."""

    async def init(connection: asyncpg.Connection) -> None:
        await dialect.setup_asyncpg_json_codec(_Adapted(connection))
        await dialect.setup_asyncpg_jsonb_codec(_Adapted(connection))
        await connection.execute("SET plan_cache_mode = force_generic_plan")

    return init


def _caches_statements(driver: Any) -> bool:
    """Whether this asyncpg connection keeps prepared statements (off behind PgBouncer: plumbing/db.py)."""
    cache = getattr(driver, "_stmt_cache", None)
    size = getattr(cache, "get_max_size", lambda: 0)()
    return isinstance(size, int) and size > 0


class _RawReads:
    """The read-only SQLite engine's one DB-API connection (the event loop's thread), with PAGE.

    `page_rows` remembers the latest rows of the links read lately, with SQLite's `PRAGMA data_version`
    of the read: that number changes on this connection whenever any other connection (any process)
    has committed since, so while it is unchanged the rows are too, and a link opened again and again
    (payday's refreshes) costs one read per commit, not one per request. Also at most ROWS_MEMO_SECONDS
    old: PAGE compares with the time (another link's expiry), not only with the data."""

    def __init__(self, engine: Engine) -> None:
        self._checked_out = engine.raw_connection()
        self.connection: Any = self._checked_out.driver_connection
        self.page = Prepared(PAGE, engine.dialect)
        # link -> (data version of the read, or None: read once, not remembered; when; the rows)
        self._memo: OrderedDict[uuid.UUID, tuple[int | None, float, PageRows | None]] = OrderedDict()

    def page_rows(self, link_id: uuid.UUID, now: datetime) -> PageRows | None:
        moment = time.monotonic()
        seen = self._memo.get(link_id)
        if seen is None or moment - seen[1] >= ROWS_MEMO_SECONDS:
            # Not read in the last second: read, and only note that it was (most links on payday are
            # opened once; asking for the data version costs about as much as what it would save).
            self._remember(link_id, (None, moment, None))
            return _page_rows(self.page.raw(self.connection, {"link_id": link_id, "now": now}))
        cursor = self.connection.execute("PRAGMA data_version")  # before the read: a commit after it shows next time
        try:
            version = cursor.fetchone()[0]
        finally:
            cursor.close()
        if seen[0] == version:
            self._memo.move_to_end(link_id)
            return seen[2]
        rows = _page_rows(self.page.raw(self.connection, {"link_id": link_id, "now": now}))
        self._remember(link_id, (version, moment, rows))
        return rows

    def _remember(self, link_id: uuid.UUID, entry: tuple[int | None, float, PageRows | None]) -> None:
        self._memo[link_id] = entry
        self._memo.move_to_end(link_id)
        if len(self._memo) > ROWS_MEMO_LINKS:
            self._memo.popitem(last=False)

    def close(self) -> None:
        self._checked_out.close()


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

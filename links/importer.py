"""Bulk import of invoices from CSV: every row validated first, then written all at once.

Columns (header row required): email,name,amount,currency,description,due_date,number,locale
(due_date, number and locale may be empty or absent). A row without a number gets one derived from
its contents (IMP-…), so importing the same file twice creates nothing twice either way.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from links.customers import new_customer, normalize_email
from links.errors import LinkError
from links.invoices import check_invoice_number, flush_new_invoices, new_invoice
from links.issuing import IssuedLink, issue_link
from links.models import Customer, Invoice
from links.verification import request_verification
from plumbing import audit
from plumbing.db import chunked, utcnow
from plumbing.i18n import SUPPORTED_LOCALES, MoneyError, check_currency, normalize_locale, to_minor_units
from plumbing.settings import Settings

REQUIRED = ("email", "name", "amount", "currency", "description")
OPTIONAL = ("due_date", "number", "locale")
MAX_ROWS = 100_000


class ImportError_(Exception):
    """The file itself cannot be read (not CSV, missing columns); one clear line."""


@dataclass(frozen=True)
class ImportRow:
    line: int
    email: str
    name: str
    amount: int
    currency: str
    description: str
    due_date: date | None
    number: str
    locale: str | None


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class ImportReport:
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    created_invoices: int = 0
    created_customers: int = 0
    already_imported: int = 0
    emailed: int = 0
    held: int = 0
    written: bool = False


def derived_number(email: str, amount: int, currency: str, description: str, due: date | None) -> str:
    digest = hashlib.sha256(f"{email}|{amount}|{currency}|{description}|{due or ''}".encode()).hexdigest()
    return f"IMP-{digest[:12].upper()}"


def parse_csv(text: str) -> tuple[list[ImportRow], list[BadRow]]:
    """Validate every row. Line numbers are those of the file (the header is line 1)."""
    try:
        return _parse(text)
    except csv.Error as exc:
        raise ImportError_(f"not a readable CSV file: {exc}") from None


def _parse(text: str) -> tuple[list[ImportRow], list[BadRow]]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ImportError_(f"the header row lacks the column(s): {', '.join(missing)} (expected {','.join(REQUIRED + OPTIONAL)})")
    reader.fieldnames = header
    rows: list[ImportRow] = []
    bad: list[BadRow] = []
    seen_numbers: dict[str, int] = {}
    for index, raw in enumerate(reader):
        line = reader.line_num  # a quoted cell may span lines: report where the row ends, as a spreadsheet shows it
        if index >= MAX_ROWS:
            raise ImportError_(f"the file has more than {MAX_ROWS} rows; split it")
        if raw.get(None):
            bad.append(BadRow(line, "more fields than columns in the header"))
            continue
        values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(values.values()):
            continue  # a blank line
        row, reason = _validate(line, values)
        if row is None:
            bad.append(BadRow(line, reason or "invalid row"))
            continue
        if row.number in seen_numbers:
            bad.append(BadRow(line, f"invoice number {row.number} is also on line {seen_numbers[row.number]}"))
            continue
        seen_numbers[row.number] = line
        rows.append(row)
    return rows, bad


def _validate(line: int, v: dict[str, str]) -> tuple[ImportRow | None, str | None]:
    try:
        email = normalize_email(v.get("email", ""))
    except LinkError as exc:
        return None, str(exc)
    if not v.get("name"):
        return None, "name is empty"
    if not v.get("description"):
        return None, "description is empty"
    try:
        currency = check_currency(v.get("currency", ""))
        amount = to_minor_units(v.get("amount", ""), currency)
    except MoneyError as exc:
        return None, str(exc)
    due: date | None = None
    if v.get("due_date"):
        try:
            due = date.fromisoformat(v["due_date"])
        except ValueError:
            return None, f"due_date {v['due_date']!r} is not a date (use YYYY-MM-DD)"
    locale = v.get("locale") or None
    if locale and normalize_locale(locale, default="") not in SUPPORTED_LOCALES:
        return None, f"locale {locale!r} is not one of {', '.join(SUPPORTED_LOCALES)}"
    try:
        number = check_invoice_number(v["number"]) if v.get("number") else derived_number(email, amount, currency, v["description"], due)
    except LinkError as exc:
        return None, str(exc)
    row = ImportRow(line, email, v["name"], amount, currency, v["description"], due, number, normalize_locale(locale) if locale else None)
    return row, None


async def check_against_database(session: AsyncSession, rows: list[ImportRow]) -> tuple[list[ImportRow], list[ImportRow], list[BadRow]]:
    """Split rows into new ones, ones already imported (same number, same invoice) and conflicts."""
    existing: dict[str, tuple[str, int, str]] = {}
    for chunk in chunked([r.number for r in rows]):
        result = await session.execute(
            select(Invoice.number, Customer.email, Invoice.amount_due, Invoice.currency)
            .join(Customer, Customer.id == Invoice.customer_id)
            .where(Invoice.number.in_(chunk))
        )
        existing.update({n: (e, a, c) for n, e, a, c in result})
    new, done, bad = [], [], []
    for row in rows:
        found = existing.get(row.number)
        if found is None:
            new.append(row)
        elif found == (row.email, row.amount, row.currency):
            done.append(row)
        else:
            bad.append(BadRow(row.line, f"invoice number {row.number} is already used by a different invoice"))
    return new, done, bad


async def write_rows(
    session: AsyncSession,
    settings: Settings,
    rows: Iterable[ImportRow],
    *,
    actor: str,
    send: bool,
    verified: bool,
    report: ImportReport,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Create customers (matched case-insensitively by email) and invoices; issue and queue links if asked."""
    rows = list(rows)
    emails = sorted({r.email for r in rows})
    customers: dict[str, Customer] = {}
    for chunk in chunked(emails):
        found = await session.execute(select(Customer).where(Customer.email.in_(chunk)))
        customers.update({c.email: c for c in found.scalars()})
    now = utcnow()
    new_customers: list[Customer] = []
    for row in rows:
        if row.email not in customers:
            customer = new_customer(
                email=row.email,
                name=row.name,
                locale=row.locale,
                verified_by=f"attested by {actor} (import)" if verified else None,
                now=now,
            )
            session.add(customer)
            customers[row.email] = customer
            new_customers.append(customer)
            report.created_customers += 1
    await session.flush()
    if send and not verified:
        for customer in new_customers:  # their invoices are held until they confirm the address
            request_verification(session, settings, customer, actor=actor)
    invoices: list[tuple[Invoice, Customer]] = []
    for row in rows:
        customer = customers[row.email]
        invoice = new_invoice(
            customer_id=customer.id,
            number=row.number,
            currency=row.currency,
            amount_due=row.amount,
            description=row.description,
            due_date=row.due_date,
        )
        session.add(invoice)
        invoices.append((invoice, customer))
    report.created_invoices = len(invoices)
    # Invoices before the links and emails that refer to them; a number taken since
    # `check_against_database` (an import or a create at the same moment) is one clear error.
    await flush_new_invoices(session, [invoice.number for invoice, _ in invoices])
    issued: list[IssuedLink] = []
    for count, (invoice, customer) in enumerate(invoices, start=1):
        if send:
            issued.append(await issue_link(session, settings, invoice=invoice, customer=customer, actor=actor, audited=False))
        if count % 200 == 0:
            progress(200)
    progress(len(invoices) % 200)
    report.emailed = sum(1 for i in issued if i.emailed)
    report.held = sum(1 for i in issued if not i.emailed)
    audit.record(
        session,
        actor,
        "import",
        "invoices",
        created=report.created_invoices,
        customers=report.created_customers,
        emailed=report.emailed,
        held=report.held,
    )

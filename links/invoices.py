"""Invoices: the one factory (CLI, importer and services use it), numbering, look-ups, the facts emails show."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Sequence
from datetime import date

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import InvoiceFacts
from links.errors import LinkError, NotFound
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from plumbing import audit
from plumbing.db import new_id
from plumbing.i18n import check_currency, to_minor_units
from plumbing.settings import Settings

# The unique constraint on invoices.number, as the database names it in an IntegrityError
# (PostgreSQL names the constraint, SQLite the column).
_NUMBER_CONSTRAINT = ("uq_invoices_number", "invoices.number")


def check_invoice_number(number: str) -> str:
    """Invoice numbers appear in email subjects: printable, one line, 1 to 64 characters."""
    number = number.strip()
    if not number or len(number) > 64:
        raise LinkError("an invoice number must be 1 to 64 characters")
    if any(unicodedata.category(c).startswith("C") for c in number):
        raise LinkError("an invoice number cannot contain line breaks or control characters")
    return number


async def next_invoice_number(session: AsyncSession) -> str:
    count = (await session.execute(select(func.count()).select_from(Invoice))).scalar_one()
    number = count + 1
    while True:
        candidate = f"INV-{number:06d}"
        if not (await session.execute(select(Invoice.id).where(Invoice.number == candidate))).first():
            return candidate
        number += 1


def new_invoice(
    *,
    customer_id: uuid.UUID,
    number: str,
    currency: str,
    amount_due: int,
    description: str,
    due_date: date | None = None,
) -> Invoice:
    """The one way an invoice row is built (CLI, importer, services): an open invoice for an amount
    in minor units. The caller adds it to its session (and see `flush_new_invoices`)."""
    if amount_due <= 0:
        raise LinkError("an invoice amount must be greater than zero")
    if not description.strip():
        raise LinkError("an invoice needs a description")
    return Invoice(
        id=new_id(),
        number=check_invoice_number(number),
        customer_id=customer_id,
        currency=check_currency(currency),
        amount_due=amount_due,
        description=description.strip(),
        due_date=due_date,
        status=InvoiceStatus.OPEN,
    )


def number_taken(exc: IntegrityError) -> bool:
    """Whether the database refused an invoice because its number is already used."""
    text = str(exc.orig)
    return any(name in text for name in _NUMBER_CONSTRAINT)


async def flush_new_invoices(session: AsyncSession, numbers: Sequence[str], *, auto_numbered: bool = False) -> None:
    """Flush newly added invoices. Another transaction may have taken one of their numbers since
    we looked (two creates at the same moment): that is one clear LinkError, not a database error."""
    try:
        await session.flush()
    except IntegrityError as exc:
        if not number_taken(exc):
            raise
        if len(numbers) != 1:
            raise LinkError("an invoice number was taken by another invoice created at the same moment; nothing was written") from None
        retry = " by an invoice created at the same moment; run the command again" if auto_numbered else ""
        raise LinkError(f"invoice number {numbers[0]} is already used{retry}") from None


async def create_invoice(
    session: AsyncSession,
    *,
    customer: Customer,
    amount: str,
    currency: str,
    description: str,
    actor: str,
    due_date: date | None = None,
    number: str | None = None,
) -> Invoice:
    currency_code = check_currency(currency)
    minor = to_minor_units(amount, currency_code)
    if not description.strip():
        raise LinkError("an invoice needs a description")
    if number is not None:
        number = check_invoice_number(number)
        if (await session.execute(select(Invoice.id).where(Invoice.number == number))).first():
            raise LinkError(f"invoice number {number} is already used")
    invoice = new_invoice(
        customer_id=customer.id,
        number=number or await next_invoice_number(session),
        currency=currency_code,
        amount_due=minor,
        description=description,
        due_date=due_date,
    )
    session.add(invoice)
    await flush_new_invoices(session, [invoice.number], auto_numbered=number is None)
    audit.record(session, actor, "invoice.create", f"invoice:{invoice.number}", amount=minor, currency=currency_code)
    return invoice


async def find_invoice(session: AsyncSession, number: str) -> Invoice:
    invoice = (await session.execute(select(Invoice).where(Invoice.number == number))).scalar_one_or_none()
    if invoice is None:
        raise NotFound(f"no invoice numbered {number}")
    return invoice


async def find_invoice_with_customer(session: AsyncSession, number: str) -> tuple[Invoice, Customer]:
    row = (
        await session.execute(select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).where(Invoice.number == number))
    ).one_or_none()
    if row is None:
        raise NotFound(f"no invoice numbered {number}")
    return row[0], row[1]


async def list_invoices(session: AsyncSession, *, status: str | None = None) -> list[tuple[Invoice, Customer]]:
    """Invoices with their customers, oldest first; only those in `status` when given."""
    query = select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).order_by(Invoice.created_at)
    if status:
        query = query.where(Invoice.status == status)
    return [(invoice, customer) for invoice, customer in (await session.execute(query)).all()]


async def invoice_links(session: AsyncSession, invoice_id: uuid.UUID) -> list[PaymentLink]:
    """Every link issued for the invoice, oldest first (revoked and expired ones too)."""
    query = select(PaymentLink).where(PaymentLink.invoice_id == invoice_id).order_by(PaymentLink.created_at)
    return list((await session.execute(query)).scalars())


def invoice_facts(settings: Settings, invoice: Invoice, customer: Customer) -> InvoiceFacts:
    return InvoiceFacts(
        merchant=settings.merchant_name,
        customer_name=customer.name,
        number=invoice.number,
        description=invoice.description,
        amount=invoice.amount_due,
        currency=invoice.currency,
        due_date=invoice.due_date,
    )
